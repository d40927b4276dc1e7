"""The isoFLOP study: dense, MoE, MoD and MoDE models trained on one training-FLOP budget.

Every model gets the same training FLOPs: its steps are ``budget / (training FLOPs per
token x tokens per step)``, with the FLOPs from :mod:`turnout.models.flops` (the same
count the trainer logs). Each (model, seed) trains through the real worker entry
(``python -m turnout.launch.worker``: DeepSpeed engine, one process) on the default
corpus, logs to MLflow as a child of one parent run in its own experiment, and the
table (validation loss mean +- std over seeds, FLOPs per forward token, wall time) and a
plot (validation loss against training FLOPs and against wall-clock) are logged to the
parent run and written to ``docs/isoflop.md`` / ``docs/isoflop.png``.

    python benchmarks/isoflop.py                 # the study (see --budget, --seeds)
    python benchmarks/isoflop.py --quick         # a smoke run: 2 models, 1 seed, tiny budget

The models (all d_model 128, 4 layers, S 256 unless named otherwise):
dense-s / dense-m / dense-l (d_model 96 / 128 / 192), moe (E=8, top-2, every block),
mod-12 and mod-50 (capacity 12.5% and 50%, every other block), mode (staged MoDE:
MoD 50% around an E=8 top-2 MoE, every other block) and imode (integrated MoDE: E=8
top-2 plus 8 no-op experts, every other block), exit (dense-m with early exits after
blocks 1-3, each exit's loss weighted 0.25) and ponder (3 layers, the last a ponder block
of up to 3 steps: up to 5 block applications). The exit and ponder rows' FLOPs are their
static training forward (every exit head, all ponder steps); their validation loss is
the static one (final exit; PonderNet's expected loss), and the child runs also log
``val_loss_causal`` and ``val_depth_mean`` (the decode rule's, see trainer/eval/depth.py).

    python benchmarks/isoflop.py --quick --models exit ponder   # just these rows, tiny budget
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from turnout.config.load import load_config
from turnout.models.flops import dense_counterpart, forward_flops

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "turnout-isoflop"

#: Shared by every model: a byte-level LM on the standard-library corpus.
BASE = [
    "model.n_layers=4",
    "model.n_heads=4",
    "model.max_seq_len=256",
    "model.moe.num_experts=8",
    "model.moe.top_k=2",
    "model.moe.capacity_factor=1.25",
    "parallel.ep_size=1",
    "parallel.zero_stage=0",
    "train.micro_batch_size=8",
    "train.warmup_steps=20",
    "train.eval_every=0",
    "train.eval_batches=16",
    "train.log_every=10",
    "launch.num_workers=1",
]

#: name -> overrides on top of BASE.
MODELS: dict[str, list[str]] = {
    "dense-s": ["model.d_model=96", "model.ffn_dim=256", "model.layer_pattern=[dense]"],
    "dense-m": ["model.d_model=128", "model.ffn_dim=384", "model.layer_pattern=[dense]"],
    "dense-l": ["model.d_model=192", "model.ffn_dim=512", "model.layer_pattern=[dense]"],
    "moe": [
        "model.d_model=128",
        "model.ffn_dim=384",
        "model.moe.expert_ffn_dim=192",
        "model.layer_pattern=[moe]",
    ],
    "mod-12": [
        "model.d_model=128",
        "model.ffn_dim=384",
        "model.mod.capacity=0.125",
        "model.layer_pattern=[dense,mod]",
    ],
    "mod-50": [
        "model.d_model=128",
        "model.ffn_dim=384",
        "model.mod.capacity=0.5",
        "model.layer_pattern=[dense,mod]",
    ],
    "mode": [
        "model.d_model=128",
        "model.ffn_dim=384",
        "model.moe.expert_ffn_dim=192",
        "model.mod.capacity=0.5",
        "model.layer_pattern=[dense,mode]",
    ],
    "imode": [
        "model.d_model=128",
        "model.ffn_dim=384",
        "model.moe.expert_ffn_dim=192",
        "model.moe.num_noop_experts=8",
        "model.layer_pattern=[dense,imode]",
    ],
    "exit": [
        "model.d_model=128",
        "model.ffn_dim=384",
        "model.layer_pattern=[dense]",
        "model.exit.layers=[1,2,3]",
        "model.exit.loss_weights=[0.25,0.25,0.25]",
    ],
    "ponder": [
        "model.d_model=128",
        "model.ffn_dim=384",
        "model.n_layers=3",
        "model.layer_pattern=[dense,dense,ponder]",
        "model.ponder.max_steps=3",
    ],
}


@dataclass
class Result:
    model: str
    seed: int
    steps: int
    flops_per_token: float
    """Forward FLOPs per token."""
    train_flops: float
    val_loss: float
    wall_s: float
    run_id: str
    depth: float = math.nan
    """Exit / ponder models: blocks per validation token under the decode rule."""
    val_causal: float = math.nan
    """Validation loss of the causal pass (MoD predictor; exit / halting rule)."""


def steps_for(overrides: list[str], budget: float) -> tuple[int, float, float]:
    """(steps, forward FLOPs per token, train FLOPs per step) for the budget."""
    cfg = load_config("tiny", overrides)
    t = cfg.train
    count = forward_flops(cfg.model, cfg.model.max_seq_len, t.micro_batch_size)
    tokens_per_step = t.micro_batch_size * t.grad_accum * cfg.model.max_seq_len
    per_step = count.train_per_token * tokens_per_step
    return max(1, math.floor(budget / per_step)), count.per_token, per_step


def run_one(name: str, seed: int, budget: float, uri: str, parent: str, workdir: Path) -> Result:
    import mlflow

    overrides = [*BASE, *MODELS[name]]
    steps, fwd, per_step = steps_for(overrides, budget)
    run_name = f"{name}-seed{seed}-{parent[:8]}"
    cmd = [
        sys.executable,
        "-m",
        "turnout.launch.worker",
        "tiny",
        *overrides,
        f"train.steps={steps}",
        f"train.seed={seed}",
        f"train.ckpt_dir={workdir / 'ckpt'}",
        f"data.cache_dir={ROOT / '.turnout_cache'}",
        f"tracking.uri={uri}",
        f"tracking.experiment={EXPERIMENT}",
        f"tracking.run_name={run_name}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"isoflop: {name} seed {seed} failed:\n{proc.stderr[-2000:]}")
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert exp is not None
    runs = client.search_runs(
        [exp.experiment_id], filter_string=f"attributes.run_name = '{run_name}'"
    )
    run = runs[0]
    client.set_tag(run.info.run_id, "mlflow.parentRunId", parent)
    return Result(
        name,
        seed,
        steps,
        fwd,
        steps * per_step,
        float(run.data.metrics["val_loss"]),
        wall,
        run.info.run_id,
        float(run.data.metrics.get("val_depth_mean", math.nan)),
        float(run.data.metrics.get("val_loss_causal", math.nan)),
    )


def table(results: list[Result], budget: float) -> str:
    lines = [
        f"Training-FLOP budget per model: {budget:.3g}",
        "",
        "| model | fwd FLOPs/token | vs dense-m | steps | val loss (mean +- std) | wall s |",
        "|---|---|---|---|---|---|",
    ]
    ref = None
    for name in MODELS:
        rows = [r for r in results if r.model == name]
        if not rows:
            continue
        if name == "dense-m":
            ref = rows[0].flops_per_token
    for name in MODELS:
        rows = [r for r in results if r.model == name]
        if not rows:
            continue
        losses = [r.val_loss for r in rows]
        std = statistics.stdev(losses) if len(losses) > 1 else 0.0
        wall = statistics.mean(r.wall_s for r in rows)
        rel = f"{rows[0].flops_per_token / ref:.2f}" if ref else "n/a"
        lines.append(
            f"| {name} | {rows[0].flops_per_token / 1e6:.2f} M | {rel} | {rows[0].steps} | "
            f"{statistics.mean(losses):.4f} +- {std:.4f} | {wall:.0f} |"
        )
    return "\n".join(lines)


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_f, ax_t) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name in MODELS:
        rows = [r for r in results if r.model == name]
        if not rows:
            continue
        ax_f.scatter([r.train_flops for r in rows], [r.val_loss for r in rows], label=name)
        ax_t.scatter([r.wall_s for r in rows], [r.val_loss for r in rows], label=name)
    ax_f.set_xlabel("training FLOPs")
    ax_t.set_xlabel("wall-clock s (process, 2 CPU threads)")
    for ax in (ax_f, ax_t):
        ax.set_ylabel("validation loss (nats/byte)")
        ax.grid(alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", type=float, default=1.0e13, help="training FLOPs per model")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--models", nargs="*", default=None, choices=list(MODELS))
    p.add_argument("--quick", action="store_true", help="2 models, 1 seed, tiny budget")
    p.add_argument("--uri", default=f"sqlite:///{ROOT / 'mlflow.db'}")
    p.add_argument("--out", default=str(ROOT / "docs" / "isoflop"), help="PATH.md and PATH.png")
    args = p.parse_args(argv)
    if args.quick:
        args.budget, args.seeds = 2.0e11, 1
        args.models = args.models or ["dense-m", "mod-12"]
    args.models = args.models or list(MODELS)
    import mlflow

    client = mlflow.MlflowClient(args.uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    exp_id = exp.experiment_id if exp else client.create_experiment(EXPERIMENT)
    parent = client.create_run(exp_id, run_name=f"isoflop-{time.strftime('%Y%m%d-%H%M%S')}")
    pid = parent.info.run_id
    client.log_param(pid, "budget", f"{args.budget:.4g}")
    client.log_param(pid, "seeds", str(args.seeds))
    workdir = ROOT / ".turnout" / "isoflop"
    workdir.mkdir(parents=True, exist_ok=True)
    dense = forward_flops(dense_counterpart(load_config("tiny", [*BASE, *MODELS["mod-12"]]).model))
    print(f"isoflop: budget {args.budget:.3g} training FLOPs per model, parent run {pid}")
    print(f"  (equal-shape dense of the MoD models: {dense.per_token / 1e6:.2f} MFLOP/token)")
    results: list[Result] = []
    for name in args.models:
        for seed in range(args.seeds):
            r = run_one(name, seed, args.budget, args.uri, pid, workdir)
            results.append(r)
            print(
                f"  {name:8s} seed {seed}: {r.steps} steps, val {r.val_loss:.4f}, {r.wall_s:.0f} s"
                + (
                    f", causal val {r.val_causal:.4f} at mean depth {r.depth:.2f} blocks"
                    if math.isfinite(r.depth)
                    else ""
                )
            )
    text = table(results, args.budget)
    print(text)
    out = Path(args.out)
    plot(results, out.with_suffix(".png"))
    client.log_text(pid, text, "isoflop.md")
    client.log_artifact(pid, str(out.with_suffix(".png")))
    client.set_terminated(pid)
    if not args.quick:
        out.with_suffix(".md").write_text(
            "# isoFLOP study\n\n```sh\npython benchmarks/isoflop.py "
            + " ".join(argv if argv is not None else sys.argv[1:])
            + "\n```\n\n"
            + text
            + "\n\n![val loss vs training FLOPs and wall-clock](isoflop.png)\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
