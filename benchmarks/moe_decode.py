"""Benchmark: cached decode tokens/s of a Mixture-of-Experts model (every block MoE).

    python benchmarks/moe_decode.py                      # d 512, 8 layers, E 8 and 32, top-2
    python benchmarks/moe_decode.py --experts 8 --batches 1 --quick

MoE layers decode dropless through ``MoELayer.dropless_local`` (design §3.4), whatever
the capacity factor says, so each decode step is the MoE layer's path on ``B`` tokens
(batch 1: one token). Per E and batch size, the model prefills a prompt of
``context - new_tokens`` random bytes, then decodes ``new_tokens`` positions one by one
(``TransformerLM.decode_step``, fed a fixed random stream, no sampling); tokens/s is
``B * new_tokens`` over the decode seconds, the best of ``--repeats`` runs after a
warm-up, each from a copy of the same prefilled caches. The experts are
``expert_ffn_dim = ffn / top_k`` wide, so the active expert FLOPs per token equal a
dense FFN of width ``ffn``.

Shape legend: B batch, P prompt positions, N new tokens.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from turnout.config.model import ModelConfig, MoEConfig, validate_model
from turnout.models.decode import DecodeState
from turnout.models.lm import TransformerLM


def build(args: argparse.Namespace, experts: int) -> TransformerLM:
    cfg = ModelConfig(
        vocab_size=256,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        ffn_dim=args.ffn,
        max_seq_len=args.context,
        layer_pattern=["moe"],
        moe=MoEConfig(
            num_experts=experts,
            top_k=args.top_k,
            capacity_factor=1.25,
            expert_ffn_dim=args.ffn // args.top_k,
        ),
    )
    validate_model(cfg)
    torch.manual_seed(args.seed)
    return TransformerLM(cfg).eval()


@torch.no_grad()
def decode(model: TransformerLM, state: DecodeState, stream_BN: torch.Tensor) -> None:
    for i in range(stream_BN.shape[1]):
        model.decode_step(stream_BN[:, i : i + 1], state)


@torch.no_grad()
def decode_seconds(
    model: TransformerLM, prompt_BP: torch.Tensor, stream_BN: torch.Tensor, repeats: int
) -> list[float]:
    """Seconds of decoding ``stream_BN`` after the prompt, per repeat (after a warm-up)."""
    _, state = model.prefill(prompt_BP, max_len=prompt_BP.shape[1] + stream_BN.shape[1])
    decode(model, copy.deepcopy(state), stream_BN)  # warm-up, untimed
    times = []
    for _ in range(repeats):
        fresh = copy.deepcopy(state)
        t0 = time.perf_counter()
        decode(model, fresh, stream_BN)
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=2048, help="active expert width per token")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--experts", type=int, nargs="+", default=[8, 32])
    p.add_argument("--context", type=int, default=512, help="prompt + new tokens")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=3, help="best of N decode runs")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="small model, short context")
    args = p.parse_args(argv)
    if args.quick:
        args.d_model, args.layers, args.heads, args.ffn = 256, 4, 4, 1024
        args.context, args.new_tokens, args.repeats = 128, 16, 2
    torch.set_num_threads(args.threads)
    P, N = args.context - args.new_tokens, args.new_tokens
    print(
        f"d_model {args.d_model}, {args.layers} MoE layers, {args.heads} heads, top-{args.top_k} "
        f"of E experts {args.ffn // args.top_k} wide; context {args.context} = prompt {P} + "
        f"{N} decoded; cpu fp32, {torch.get_num_threads()} thread(s), best of {args.repeats}"
    )
    print(f"{'E':>4} {'batch':>5} {'decode tok/s':>13} {'median tok/s':>13}")
    gen = torch.Generator().manual_seed(args.seed + 1)
    for B in args.batches:
        prompt_BP = torch.randint(256, (B, P), generator=gen)
        stream_BN = torch.randint(256, (B, N), generator=gen)
        for E in args.experts:
            t = decode_seconds(build(args, E), prompt_BP, stream_BN, args.repeats)
            best, med = B * N / min(t), B * N / statistics.median(t)
            print(f"{E:>4} {B:>5} {best:>13.1f} {med:>13.1f}", flush=True)


if __name__ == "__main__":
    main()
