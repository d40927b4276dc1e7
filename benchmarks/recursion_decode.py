"""Benchmark: cached decode tokens/s of a Mixture-of-Recursions model vs two dense models.

    python benchmarks/recursion_decode.py            # d 512, group 4, 3 recursions, ctx 1024
    python benchmarks/recursion_decode.py --quick    # small smoke run (~30 s)

Four models, built in the same run, fed the same prompt and the same token stream:

- **MoR** ``[dense, recursion, dense]``: a group of ``--group`` blocks shared across 3
  recursions, expert routing with the default capacities (1, 2/3, 1/3: 2 recursions per
  token on average), ``cache: per_recursion``; and the same model with
  ``cache: shared_first``;
- **dense, equal parameters**: ``2 + group`` dense blocks (the MoR model's weights once);
- **dense, equal compute**: ``2 + 2 * group`` dense blocks (a token's mean work in MoR).

Decode runs through :mod:`turnout.models.decode` exactly as ``turnout generate`` does;
tokens/s = batch * new tokens / decode seconds, best of ``--repeats`` (the models
alternate within each repeat, as ``benchmarks/generate.py`` times them, whose prefill,
decode and timing helpers this script uses).

**The predictors are calibrated.** A random-init predictor says "continue" for about half
the tokens. Before timing, each routed recursion's predictor output bias is set, on the
last positions of the prompt run through the causal forward recursion by recursion, so
that the share of the tokens reaching recursion r that run it is ``capacity_r /
capacity_{r-1}`` (2/3 then 1/2): the rates a trained predictor aims at. The decoded
tokens are new draws, so the recursions measured (from the decode state's depth
histogram) are out of sample and printed.

Shape legend: B batch, S positions, P prompt positions, N new tokens, D width.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate import DTYPES, decode, prefill, time_decodes  # noqa: E402

from turnout.config.model import ModelConfig, RecursionConfig, validate_model  # noqa: E402
from turnout.models.decode import DecodeState  # noqa: E402
from turnout.models.lm import TransformerLM  # noqa: E402
from turnout.models.recursion import CHOOSE_ABOVE_LOGIT, RecursionBlock  # noqa: E402

R = 3


def build(args: argparse.Namespace, n_layers: int, pattern: list[str], cache: str) -> TransformerLM:
    cfg = ModelConfig(
        vocab_size=args.vocab,
        d_model=args.d_model,
        n_layers=n_layers,
        n_heads=args.heads,
        ffn_dim=args.ffn,
        max_seq_len=args.context,
        layer_pattern=pattern,
        recursion=RecursionConfig(max_recursions=R, group=args.group, cache=cache),
    )
    validate_model(cfg)
    torch.manual_seed(args.seed)
    model = TransformerLM(cfg).eval()
    return model.to(device=args.device, dtype=DTYPES[args.dtype])


@torch.no_grad()
def calibrate(model: TransformerLM, tokens_BS: torch.Tensor, tail: int) -> None:
    """Set each routed recursion's predictor bias so that, on the last ``tail`` positions,
    ``capacity_r / capacity_{r-1}`` of the tokens that ran recursion r-1 run recursion r."""
    B, S = tokens_BS.shape
    pos_BS = torch.arange(S, device=tokens_BS.device).unsqueeze(0).expand(B, S)
    x_BSD = model.embed(tokens_BS)
    for layer in model.layers:
        if not isinstance(layer, RecursionBlock):
            x_BSD, _ = layer(x_BSD, pos_BS)
            continue
        h_BSD, run_BS = x_BSD, torch.ones(B, S, dtype=torch.bool, device=x_BSD.device)
        first: list = []
        first_BS = None
        for r in range(layer.max_recursions):
            score_BS = layer.scores(h_BSD, r)
            if r in layer.decided():
                last = layer.predictors[str(r)][-1]
                last.bias.zero_()
                logits_BS = layer.causal_logits(h_BSD, score_BS, r)
                among = logits_BS[:, -tail:][run_BS[:, -tail:]].float()
                keep = layer.capacities[r] / layer.capacities[r - 1]
                threshold = torch.quantile(among, 1.0 - keep)
                last.bias -= (threshold - CHOOSE_ABOVE_LOGIT).to(last.bias.dtype)
                run_BS = run_BS & (layer.causal_logits(h_BSD, score_BS, r) > CHOOSE_ABOVE_LOGIT)
            g_BS = layer.gate(score_BS)
            h_BSD = layer._masked(h_BSD, pos_BS, run_BS, g_BS, r, first, first_BS)
            first_BS = run_BS if first_BS is None else first_BS
        x_BSD = h_BSD


def mean_recursions(model: TransformerLM, before: DecodeState, stream_BN: torch.Tensor) -> float:
    """Mean recursions per decoded token (an untimed decode from a copy of ``before``)."""
    done = copy.deepcopy(before)
    decode(model, done, stream_BN)
    hist = {k: v - before.depth.get(k, 0) for k, v in done.depth.items()}
    n = sum(hist.values())
    blocks = sum(k * v for k, v in hist.items()) / max(n, 1)
    return (blocks - (model.cfg.n_layers - 1)) / model.cfg.recursion.group


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--context", type=int, default=1024, help="prompt + new tokens")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=5, help="best of N decode runs")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="small model, short context")
    args = p.parse_args(argv)
    if args.quick:
        args.d_model, args.group, args.heads, args.ffn = 256, 2, 4, 1024
        args.context, args.new_tokens, args.repeats = 256, 32, 2
    if not 0 < args.new_tokens < args.context:
        p.error("--new-tokens must be in (0, --context)")
    args.device = torch.device(args.device)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    g = args.group
    models = {
        "MoR per_recursion": build(args, 3, ["dense", "recursion", "dense"], "per_recursion"),
        "MoR shared_first": build(args, 3, ["dense", "recursion", "dense"], "shared_first"),
        f"dense {2 + g} blocks (=params)": build(args, 2 + g, ["dense"], "per_recursion"),
        f"dense {2 + 2 * g} blocks (=compute)": build(args, 2 + 2 * g, ["dense"], "per_recursion"),
    }
    P, N = args.context - args.new_tokens, args.new_tokens
    gen = torch.Generator().manual_seed(args.seed + 1)
    print(
        f"d_model {args.d_model}, group {g} x {R} recursions, {args.heads} heads, ffn "
        f"{args.ffn}; context {args.context} = prompt {P} + {N} decoded; {args.device} "
        f"{args.dtype}, {args.threads} thread(s), best of {args.repeats}"
    )
    names = list(models)
    for B in args.batches:
        prompt_BP = torch.randint(args.vocab, (B, P), generator=gen).to(args.device)
        stream_BN = torch.randint(args.vocab, (B, N), generator=gen).to(args.device)
        states, depth = [], {}
        for name, model in models.items():
            if model.cfg.uses_recursion():
                calibrate(model, prompt_BP, tail=min(P, max(N, 256)))
            _, state = prefill(model, prompt_BP, N)
            states.append(state)
            if model.cfg.uses_recursion():
                depth[name] = mean_recursions(model, state, stream_BN)  # warm-up too
            else:
                decode(model, copy.deepcopy(state), stream_BN)  # warm-up
        times = time_decodes(list(models.values()), states, stream_BN, args.repeats)
        tok_s = {n: B * N / min(t) for n, t in zip(names, times, strict=True)}
        print(f"\nbatch {B}")
        for name in names:
            extra = f"  mean recursions {depth[name]:.2f}" if name in depth else ""
            print(f"  {name:<28} {tok_s[name]:>9.1f} decode tok/s{extra}")
        for mor in names[:2]:
            print(
                f"  {mor}: {tok_s[mor] / tok_s[names[2]]:.2f}x the equal-parameter dense, "
                f"{tok_s[mor] / tok_s[names[3]]:.2f}x the equal-compute dense"
            )


if __name__ == "__main__":
    main()
