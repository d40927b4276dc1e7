"""Benchmark: the function-name task's encoders at equal training FLOPs, F1 side by side.

    python benchmarks/structure_names.py                       # 2e12 FLOPs, seeds 0 1
    python benchmarks/structure_names.py --budget 5e11 --seeds 0 --presets ast-gnn

Each preset (default: ast-treelstm, ast-gnn, ast-gnn-moe and the structure-free
baseline ast-transformer) trains through ``turnout train`` (the real launcher: Ray
workers, DeepSpeed, the presets' layouts) for as many steps as reach ``--budget``
training FLOPs: the run's own count (FLOPs per node from ``trainer/structure/flops.py``
times the real nodes of each step's functions, which the sampler fixes from the seed),
so every model sees the same compute, not the same steps. Validation scores
``--eval-batches`` batches of every held-out file's functions at the end. Printed per
preset: steps, training FLOPs, val loss, subtoken F1, exact match and wall seconds per
seed, then the mean F1 and its ratio to the transformer baseline's.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

PRESETS = ("ast-treelstm", "ast-gnn", "ast-gnn-moe", "ast-transformer")
BASELINE = "ast-transformer"


def steps_for(preset: str, budget: float, seed: int, overrides: list[str]) -> tuple[int, float]:
    """(steps, training FLOPs they cost) for ``preset`` to reach ``budget``."""
    from turnout.config.load import load_config
    from turnout.trainer.data.structure.dataset import StructureData
    from turnout.trainer.data.structure.prepare import prepare_structure
    from turnout.trainer.structure.flops import structure_run_flops
    from turnout.trainer.structure.sampler import StructureSampler

    cfg = load_config(preset, [*overrides, f"train.seed={seed}"])
    folder, _ = prepare_structure(cfg)
    t = cfg.train
    sampler = StructureSampler(
        StructureData(folder), cfg.model.structure.encoder, t.micro_batch_size, 0, 1, t.seed
    )
    per_node, _ = structure_run_flops(cfg, sampler)
    slots = t.micro_batch_size * t.grad_accum * cfg.launch.num_workers
    spent, step = 0.0, 0
    while spent < budget:
        spent += per_node * sampler.step_nodes(step, slots)
        step += 1
    return step, spent


def _value(stdout: str, label: str) -> str:
    m = re.search(rf"^\s+{re.escape(label)}\s+(\S+)", stdout, re.MULTILINE)
    return m.group(1) if m else "nan"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=2e12)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--presets", nargs="+", default=list(PRESETS))
    ap.add_argument("--eval-batches", type=int, default=25)
    ap.add_argument("overrides", nargs="*", help="config overrides for every preset")
    args = ap.parse_args()
    exe = str(Path(sys.executable).with_name("turnout"))
    f1s: dict[str, list[float]] = {}
    print(f"budget {args.budget:.3g} training FLOPs, seeds {args.seeds}", flush=True)
    print("preset           seed  steps  train FLOPs  val loss    F1   exact  wall s", flush=True)
    for preset in args.presets:
        for seed in args.seeds:
            steps, _ = steps_for(preset, args.budget, seed, args.overrides)
            cmd = [
                exe, "train", preset, *args.overrides, f"train.seed={seed}",
                f"train.steps={steps}", f"train.warmup_steps={max(1, steps // 10)}",
                "train.eval_every=0", f"train.eval_batches={args.eval_batches}",
                "train.log_every=50", "tracking.enabled=false", "train.keep_checkpoints=1",
            ]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                print(f"{preset:<16} {seed:>4}  failed: {tail}", flush=True)
                continue
            out = proc.stdout
            f1 = float(_value(out, "val subtoken F1"))
            f1s.setdefault(preset, []).append(f1)
            print(
                f"{preset:<16} {seed:>4} {steps:>6}  {_value(out, 'training FLOPs'):>11}"
                f"  {_value(out, 'final val loss'):>8}  {f1:.3f}"
                f"  {_value(out, 'val exact match'):>5}  {_value(out, 'wall time'):>6}",
                flush=True,
            )
    base = statistics.mean(f1s[BASELINE]) if f1s.get(BASELINE) else float("nan")
    print("\nmean F1 over seeds, and over the transformer baseline's:")
    for preset, values in f1s.items():
        mean = statistics.mean(values)
        print(f"  {preset:<16} {mean:.3f}  {mean / base if base else float('nan'):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
