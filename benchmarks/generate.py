"""Benchmark: cached decode tokens/s of a Mixture-of-Depths model vs the dense model.

    python benchmarks/generate.py                  # d 512, 8 layers, context 1024, batch 1 and 8
    python benchmarks/generate.py --quick          # small smoke run (~20 s)
    python benchmarks/generate.py --device cuda --dtype bf16 --threads 4

Two models of one shape, built in the same run: dense (``layer_pattern [dense]``) and
MoD (``layer_pattern [dense, mod]``: every other block MoD-routed, capacity 12.5 %).
For each batch size, each model prefills a prompt of ``context - new_tokens`` positions
through :func:`turnout.models.decode.extend` and then decodes ``new_tokens`` positions one
by one (``TransformerLM.decode_step``); only the decode steps count towards tokens/s
(prefill is reported on its own). Tokens/s = batch * new_tokens / decode seconds, the
best of ``--repeats`` runs after a warm-up (the median ratio is printed too), each run
decoding from a copy of the same prefilled caches, dense and MoD alternating. The fed
tokens are a fixed stream of uniform random bytes, the same for both models and every
run (a random-init model samples near-uniformly anyway; sampling itself is outside the
model and not timed).

**The predictor is calibrated.** A random-init MoD predictor says "process" for about half
of the tokens, not 12.5 %. Before each batch size is timed, the output bias of each routed
block's causal predictor (the MLP's last layer) is set so that, on the last 256 positions
(at least ``new_tokens``) of that batch's prompt, run through the causal forward block by
block, exactly ``capacity`` of the tokens land above the decision threshold. (Random-init
hidden states carry a large per-sequence component and drift with position, so a bias
fitted on other sequences or on early positions misses the rate by 2-4x; fitting on the
prompt's tail is the stand-in for a trained predictor, which hits the rate by itself.) The
decoded tokens are new random draws, so the processed fraction reported (from
``DecodeState.routed_work()``, decode steps only) is measured out of sample and can differ
from the target. Nothing else about the model is changed.

Batched decode runs a routed block only on the sequences of the step that chose the
token (see the :mod:`turnout.models.decode` docstring): a skipped sequence does no work
there, attention included, at any batch size. What batch 8 adds is the per-step
bookkeeping of the sub-batch (a gather and an ``index_copy`` of the chosen rows) and
that the dense blocks' larger batched GEMMs run closer to the machine's peak than the
routed blocks' small ones. The "whole batch skipped" figure is printed for reference.

For the dense model it also prints the achieved TFLOP/s of prefill and of decode: the
forward FLOPs of :mod:`turnout.models.flops` (decode: one token through every block with
attention over the cached keys, averaged over the decode) over the measured seconds.

``--rerun N`` also times the old decode at batch 1, as a peer: one full causal-mode forward
of the whole window per new token (masked-dense: attention over every position, the FFN
on the chosen rows only), best of N.

Shape legend: B batch, S positions, P prompt positions, N new tokens, D width.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from turnout.config.model import MoDConfig, ModelConfig, validate_model
from turnout.models.decode import DecodeState
from turnout.models.flops import forward_flops
from turnout.models.lm import TransformerLM
from turnout.models.mod import CHOOSE_ABOVE_LOGIT, MoDBlock

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(args: argparse.Namespace, pattern: list[str]) -> TransformerLM:
    cfg = ModelConfig(
        vocab_size=args.vocab,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        ffn_dim=args.ffn,
        max_seq_len=args.context,
        layer_pattern=pattern,
        mod=MoDConfig(capacity=args.capacity, predictor="mlp"),
    )
    validate_model(cfg)
    torch.manual_seed(args.seed)
    model = TransformerLM(cfg).eval()
    return model.to(device=args.device, dtype=DTYPES[args.dtype])


@torch.no_grad()
def calibrate(model: TransformerLM, tokens_BS: torch.Tensor, capacity: float, tail: int) -> None:
    """Set each routed block's predictor bias so ``capacity`` of the last ``tail`` positions
    of these sequences run it.

    Block by block, in the causal forward: a block's input depends on the calibrated
    decisions of the routed blocks before it.
    """
    B, S = tokens_BS.shape
    pos_BS = torch.arange(S, device=tokens_BS.device).unsqueeze(0).expand(B, S)
    x_BSD = model.embed(tokens_BS)
    for layer in model.layers:
        if isinstance(layer, MoDBlock):
            last = layer.predictor[-1]
            last.bias.zero_()
            logits_BS = layer.causal_logits(x_BSD, layer.scores(x_BSD))
            threshold = torch.quantile(logits_BS[:, -tail:].float().flatten(), 1.0 - capacity)
            last.bias -= (threshold - CHOOSE_ABOVE_LOGIT).to(last.bias.dtype)
            x_BSD, _ = layer(x_BSD, pos_BS, routing="causal")
        else:
            x_BSD, _ = layer(x_BSD, pos_BS)


def dense_flops(cfg: ModelConfig, prompt: int, new: int) -> tuple[float, float]:
    """Forward FLOPs per token of the dense model ``cfg``: in the prefill of ``prompt``
    positions, and in one decode step averaged over ``new`` steps (models/flops.py
    conventions: attention scores over every key, ``4 D`` per key and block)."""
    prefill = forward_flops(cfg, seq_len=prompt).per_token
    one_key = forward_flops(cfg, seq_len=1).per_token
    mean_keys = prompt + (new + 1) / 2
    return prefill, one_key + cfg.n_layers * 4 * cfg.d_model * (mean_keys - 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def decode(model: TransformerLM, state: DecodeState, stream_BN: torch.Tensor) -> None:
    for i in range(stream_BN.shape[1]):
        model.decode_step(stream_BN[:, i : i + 1], state)


@torch.no_grad()
def prefill(model: TransformerLM, prompt_BP: torch.Tensor, N: int) -> tuple[float, DecodeState]:
    """Seconds of the prompt's prefill (after a short warm-up) and the prefilled state."""
    device = prompt_BP.device
    _, warm = model.prefill(prompt_BP[:, :16], max_len=16 + 4)
    decode(model, warm, prompt_BP[:, 16:20])
    _sync(device)
    t0 = time.perf_counter()
    _, state = model.prefill(prompt_BP, max_len=prompt_BP.shape[1] + N)
    _sync(device)
    return time.perf_counter() - t0, state


@torch.no_grad()
def routed_decode_work(
    mod: TransformerLM, state: DecodeState, stream_BN: torch.Tensor
) -> tuple[float, float]:
    """Processed fraction of the routed-block decode work (``DecodeState.routed_work()``)
    and the share of (decode step, routed block) pairs where no sequence chose the token.

    An untimed decode from a copy of ``state``; it also warms up the decode path.
    """
    decisions: list[bool] = []

    def record(_module: torch.nn.Module, _inputs: object, logits_BS1: torch.Tensor) -> None:
        decisions.append(bool((logits_BS1 <= CHOOSE_ABOVE_LOGIT).all()))

    hooks = [
        layer.predictor.register_forward_hook(record)
        for layer in mod.layers
        if isinstance(layer, MoDBlock)
    ]
    done = copy.deepcopy(state)
    try:
        decode(mod, done, stream_BN)
    finally:
        for hook in hooks:
            hook.remove()
    (p0, s0), (p1, s1) = state.routed_work(), done.routed_work()
    processed, skipped = p1 - p0, s1 - s0
    return processed / max(processed + skipped, 1), sum(decisions) / max(len(decisions), 1)


@torch.no_grad()
def time_decodes(
    models: list[TransformerLM], states: list[DecodeState], stream_BN: torch.Tensor, repeats: int
) -> list[list[float]]:
    """Decode seconds per model and repeat; the models alternate within each repeat, so
    both see the same machine load."""
    device = stream_BN.device
    times: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        for model, state, out in zip(models, states, times, strict=True):
            fresh = copy.deepcopy(state)
            _sync(device)
            t0 = time.perf_counter()
            decode(model, fresh, stream_BN)
            _sync(device)
            out.append(time.perf_counter() - t0)
    return times


@torch.no_grad()
def rerun_seconds_per_token(model: TransformerLM, prompt_BP: torch.Tensor, steps: int) -> float:
    """The old decode: a full causal forward of the window for every new token."""
    device = prompt_BP.device
    window_BS = prompt_BP
    model(window_BS[:, :16], routing="causal")
    best = float("inf")
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        model(window_BS, routing="causal")
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--context", type=int, default=1024, help="prompt + new tokens")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--capacity", type=float, default=0.125)
    p.add_argument("--repeats", type=int, default=5, help="best of N decode runs")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rerun", type=int, default=0, help="time N old full-window steps too")
    p.add_argument("--quick", action="store_true", help="small model, short context")
    args = p.parse_args(argv)
    if args.quick:
        args.d_model, args.layers, args.heads, args.ffn = 256, 4, 4, 1024
        args.context, args.new_tokens, args.repeats = 256, 32, 2
    if args.dtype == "bf16" and args.device == "cpu":
        p.error("--dtype bf16 is for --device cuda (CPU runs fp32)")
    if not 0 < args.new_tokens < args.context:
        p.error("--new-tokens must be in (0, --context)")
    args.device = torch.device(args.device)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    dev = args.device
    dense = build(args, ["dense"])
    mod = build(args, ["dense", "mod"])
    P, N = args.context - args.new_tokens, args.new_tokens
    gen = torch.Generator().manual_seed(args.seed + 1)
    print(
        f"d_model {args.d_model}, {args.layers} layers, {args.heads} heads, ffn {args.ffn}, "
        f"vocab {args.vocab}; context {args.context} = prompt {P} + {N} decoded; "
        f"{args.device} {args.dtype}, {args.threads} thread(s), best of {args.repeats}"
    )
    print(f"MoD: layer_pattern [dense, mod], capacity {args.capacity:.1%}")
    header = f"{'batch':>5} {'model':>6} {'prefill ms':>11} {'decode tok/s':>13} {'processed':>10}"
    prefill_fpt, decode_fpt = dense_flops(dense.cfg, P, N)
    best_prefill = best_decode = 0.0
    for B in args.batches:
        prompt_BP = torch.randint(args.vocab, (B, P), generator=gen).to(dev)
        stream_BN = torch.randint(args.vocab, (B, N), generator=gen).to(dev)
        calibrate(mod, prompt_BP, args.capacity, tail=min(P, max(N, 256)))
        (pre_dense, st_dense), (pre_mod, st_mod) = (prefill(m, prompt_BP, N) for m in (dense, mod))
        decode(dense, copy.deepcopy(st_dense), stream_BN)  # warm-up, untimed
        frac, all_skip = routed_decode_work(mod, st_mod, stream_BN)  # warm-up too
        t_dense, t_mod = time_decodes([dense, mod], [st_dense, st_mod], stream_BN, args.repeats)
        print(f"\n{header}")
        for name, pre, t, share in (
            ("dense", pre_dense, t_dense, "-"),
            ("MoD", pre_mod, t_mod, f"{frac:.1%}"),
        ):
            print(f"{B:>5} {name:>6} {pre * 1e3:>11.1f} {B * N / min(t):>13.1f} {share:>10}")
        med = statistics.median(t_dense) / statistics.median(t_mod)
        print(
            f"batch {B}: predictor calibrated to process {args.capacity:.1%} "
            f"(measured {frac:.1%} of routed-block decode work; the whole batch skipped "
            f"{all_skip:.0%} of routed-block steps)\n"
            f"batch {B}: decode MoD/dense {min(t_dense) / min(t_mod):.2f}x (best), "
            f"{med:.2f}x (median); prefill MoD/dense {pre_dense / pre_mod:.2f}x"
        )
        tf_prefill = prefill_fpt * B * P / pre_dense / 1e12
        tf_decode = decode_fpt * B * N / min(t_dense) / 1e12
        best_prefill, best_decode = max(best_prefill, tf_prefill), max(best_decode, tf_decode)
        print(
            f"batch {B}: dense model achieved {tf_prefill:.3g} TFLOP/s in prefill, "
            f"{tf_decode:.3g} TFLOP/s in decode"
        )
    print(
        f"\nbest achieved TFLOP/s (dense model): prefill {best_prefill:.3g}, "
        f"decode {best_decode:.3g}"
    )
    if args.rerun:
        prompt_1S = torch.randint(args.vocab, (1, args.context), generator=gen).to(dev)
        old_dense = rerun_seconds_per_token(dense, prompt_1S, args.rerun)
        old_mod = rerun_seconds_per_token(mod, prompt_1S, args.rerun)
        print(
            f"\nold re-run-the-window decode, batch 1, window {args.context}: "
            f"dense {1 / old_dense:.2f} tok/s, MoD {1 / old_mod:.2f} tok/s "
            f"(MoD/dense {old_dense / old_mod:.2f}x)"
        )


if __name__ == "__main__":
    main()
