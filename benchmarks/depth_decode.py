"""Benchmark: decode speed against quality of an early-exit or ponder checkpoint, per threshold.

    python benchmarks/depth_decode.py CHECKPOINT [--thresholds 1 0.8 0.5] [--new-tokens 128]

For each threshold (the exit confidence or the cumulative halting probability; 1.0 is
full depth), on one process:

- quality: the validation cross-entropy of the causal pass at that threshold (what
  KV-cached decoding computes, token by token; ``tests/unit/test_exit.py`` and
  ``test_ponder.py`` hold the two equal), over ``--batches`` of the run's validation
  windows, and the mean blocks per token there;
- cost: forward FLOPs per token at that depth distribution (``models.flops.expected_flops``);
- speed: greedy KV-cached decoding of ``--new-tokens`` tokens after a validation prompt
  of ``--prompt`` tokens, batch 1, decode steps only (prefill timed apart and left out),
  best of ``--repeats``; and the fraction of the greedy tokens equal to full depth's.

Shape legend: B batch, S sequence.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from turnout.config.choices import Routing
from turnout.models import decode
from turnout.models.flops import expected_flops, forward_flops
from turnout.trainer.data.batches import BatchSampler, open_tokens, prepare_corpus
from turnout.trainer.weights.from_checkpoint import load_for_inference


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--thresholds", type=float, nargs="+", default=[1.0, 0.8, 0.5])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, cfg, _ = load_for_inference(args.checkpoint, "cpu")
    model = model.float().eval()
    kind = cfg.model.depth_kind()
    if kind is None:
        raise SystemExit("depth_decode: the checkpoint has no early exits and no ponder block")
    data = open_tokens(prepare_corpus(cfg.data), cfg.data.val_fraction)
    S = cfg.model.max_seq_len
    sampler = BatchSampler(data, S, cfg.train.micro_batch_size, 0, 1, 0, args.batches)
    prompt_1P = sampler.eval_batch(0)[0][:1, : args.prompt]
    n_new = min(args.new_tokens, S - args.prompt)
    static = forward_flops(cfg.model, S).per_token
    print(
        f"depth_decode: {args.checkpoint} ({kind}), static forward {static / 1e6:.2f} MFLOP/token"
    )
    print(
        "| threshold | val loss (decode rule) | mean blocks | fwd MFLOP/token | "
        "decode tokens/s | greedy = full depth |"
    )
    print("|---|---|---|---|---|---|")
    reference = None
    for thr in args.thresholds:
        ce, hist = 0.0, {}
        with torch.no_grad():
            for i in range(args.batches):
                tokens_BS, targets_BS = sampler.eval_batch(i)
                out = model(tokens_BS, targets_BS, routing=Routing.CAUSAL, threshold=thr)
                ce += float(out.ce) / args.batches
                assert out.depth is not None
                for k, v in out.depth.histogram().items():
                    hist[k] = hist.get(k, 0) + v
        mean = sum(k * v for k, v in hist.items()) / sum(hist.values())
        best, tokens = math.inf, None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            state = decode.new_state(model, 1, args.prompt, thr)
            decode.extend(model, prompt_1P, state)
            prefill_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            gen = decode.generate(model, prompt_1P, n_new, 0.0, None, thr)
            best = min(best, time.perf_counter() - t0 - prefill_s)
            tokens = gen.tokens_BS[0, args.prompt :]
        assert tokens is not None
        if reference is None:
            reference = tokens
        same = float((tokens == reference).float().mean())
        print(
            f"| {thr:g} | {ce:.4f} | {mean:.2f} | {expected_flops(cfg.model, hist) / 1e6:.2f} | "
            f"{n_new / best:.0f} | {same:.0%} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
