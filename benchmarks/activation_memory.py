"""Benchmark: activation memory and step time under ``train.activation_checkpointing``.

One process, a small MoDE-style model (dense, moe, mode, mod, imode blocks), fp32, on
the CPU by default (``--device cuda`` on a GPU). For each mode (none, moe, full) it
reports, side by side with the ratio to ``none``:

- ``kept``: bytes saved for backward at the end of the forward, measured with
  ``torch.autograd.graph.saved_tensors_hooks`` (each storage once);
- ``peak``: kept + the largest recomputed block's own saved bytes (the backward holds
  one recomputed block at a time), as ``turnout plan`` models it; ``planned`` is the
  planner's estimate of the same, for this model's shape and fp32;
- ``cuda_peak``: ``torch.cuda.max_memory_allocated`` over a step (CUDA only);
- ``step``: median wall time of forward + backward over ``--iters`` steps, after
  ``--warmup`` (the recompute costs roughly one extra forward of the recomputed blocks).

Modes are timed in interleaved rounds, so background load hits all alike.

    python benchmarks/activation_memory.py
    python benchmarks/activation_memory.py --batch 8 --seq 256 --d-model 256 --iters 10
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from turnout.config.model import MoDConfig, ModelConfig, MoEConfig
from turnout.models.lm import TransformerLM
from turnout.models.saved_bytes import saved_bytes_by_block
from turnout.trainer.planner.memory import activations

MODES = ("none", "moe", "full")


def _cfg(args: argparse.Namespace) -> ModelConfig:
    pattern = ["dense", "moe", "mode", "mod", "imode", "moe"]
    return ModelConfig(
        vocab_size=256,
        d_model=args.d_model,
        n_heads=4,
        ffn_dim=2 * args.d_model,
        max_seq_len=args.seq,
        n_layers=len(pattern),
        layer_pattern=pattern,
        moe=MoEConfig(num_experts=8, top_k=2, capacity_factor=1.25, num_noop_experts=2),
        mod=MoDConfig(capacity=0.5),
    )


def _model(cfg: ModelConfig, mode: str, device: torch.device) -> TransformerLM:
    torch.manual_seed(0)
    model = TransformerLM(cfg).to(device)
    model.set_activation_checkpointing(mode)
    return model


def saved_bytes(model: TransformerLM, tokens: torch.Tensor) -> tuple[int, dict[int, int]]:
    """(bytes kept for backward after one forward, each block's own saved bytes)."""
    per = saved_bytes_by_block(model, tokens)
    blocks = {i: b for i, b in per.items() if i is not None}
    return sum(per.values()), blocks


def step(model: TransformerLM, tokens: torch.Tensor) -> float:
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    out = model(tokens[:, :-1], tokens[:, 1:])
    assert out.loss is not None
    out.loss.backward()
    if tokens.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    cfg = _cfg(args)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (args.batch, args.seq + 1), generator=gen).to(device)
    models = {m: _model(cfg, m, device) for m in MODES}

    _, per_block = saved_bytes(models["none"], tokens)
    kinds = cfg.blocks()
    kept, peak, planned, cuda_peak = {}, {}, {}, {}
    for mode in MODES:
        kept[mode], _ = saved_bytes(models[mode], tokens)
        recomputed = [b for i, b in per_block.items() if models[mode]._recomputed[i]]
        peak[mode] = kept[mode] + max(recomputed, default=0)
        planned[mode] = activations(cfg, args.seq, args.batch, "fp32", mode).total
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            step(models[mode], tokens)
            cuda_peak[mode] = torch.cuda.max_memory_allocated(device) - base
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(args.warmup + args.iters):
        for mode in MODES:
            t = step(models[mode], tokens)
            if r >= args.warmup:
                times[mode].append(t)
    med = {m: statistics.median(times[m]) for m in MODES}

    print(
        f"model: {[k.name for k in kinds]}, d_model {args.d_model}, batch {args.batch} x "
        f"seq {args.seq}, fp32, {device.type}, torch {torch.__version__}"
    )
    head = f"{'mode':<6} {'kept MiB':>9} {'ratio':>6} {'peak MiB':>9} {'ratio':>6} "
    head += f"{'planned MiB':>11} {'ratio':>6} "
    if cuda_peak:
        head += f"{'cuda MiB':>9} {'ratio':>6} "
    head += f"{'step ms':>8} {'ratio':>6}"
    print(head)
    mib = 2**20
    for mode in MODES:
        row = f"{mode:<6} {kept[mode] / mib:>9.2f} {kept[mode] / kept['none']:>6.3f} "
        row += f"{peak[mode] / mib:>9.2f} {peak[mode] / peak['none']:>6.3f} "
        row += f"{planned[mode] / mib:>11.2f} {planned[mode] / planned['none']:>6.3f} "
        if cuda_peak:
            row += f"{cuda_peak[mode] / mib:>9.2f} {cuda_peak[mode] / cuda_peak['none']:>6.3f} "
        row += f"{med[mode] * 1e3:>8.1f} {med[mode] / med['none']:>6.3f}"
        print(row)


if __name__ == "__main__":
    main()
