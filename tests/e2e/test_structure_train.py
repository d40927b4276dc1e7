"""End to end: the function-name task through ``turnout train`` (issue 25).

The MoE graph network (preset ``ast-gnn-moe``: 2 Ray workers, experts split over them,
ZeRO-2) trains a few steps on a slice of the standard library with a real MLflow store;
the run logs F1, nodes/s, FLOPs per node and the expert loads. Its checkpoint then
resumes on one worker holding every expert (torchrun), and ``turnout eval`` scores the
result while ``turnout generate`` refuses it in one line.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.jobs import summary_value
from turnout.trainer.weights.from_checkpoint import consolidated_state

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SHORT = [
    "train.steps=4",
    "train.eval_every=2",
    "train.log_every=2",
    "train.eval_batches=2",
    "train.warmup_steps=1",
    "train.micro_batch_size=4",
    "data.max_bytes=600000",
    "data.ast.target_vocab=64",
    "data.val_fraction=0.2",
]


def test_a_graph_moe_trains_resumes_on_one_worker_and_is_scored(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from tests.e2e.test_cli_train import _run, _turnout

    proc = _run([*_turnout(), "train", "ast-gnn-moe", *SHORT], tmp_path, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    assert "function names from the gnn encoder with MoE FFNs" in proc.stdout
    f1 = float(summary_value(proc.stdout, "val subtoken F1"))
    assert 0.0 <= f1 <= 1.0
    assert float(summary_value(proc.stdout, "throughput").replace(",", "")) > 0
    ckpt = summary_value(proc.stdout, "checkpoint")
    run_id = summary_value(proc.stdout, "MLflow run id")

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for key in ("val_f1", "val_exact", "val_loss", "nodes_per_s", "flops_per_node", "loss"):
        assert key in metrics, sorted(metrics)
    assert any(re.fullmatch(r"layer0/.*", k) for k in metrics), sorted(metrics)
    assert metrics["val_f1"] == pytest.approx(f1, abs=5e-4)  # the summary rounds to 3 places
    assert run.data.params["structure.train_examples"] != "0"

    # Resume the 2-rank, ep-2 checkpoint on 1 rank holding all 4 experts.
    resume = [
        *SHORT,
        "train.steps=6",
        f"train.resume={ckpt}",
        "launch.num_workers=1",
        "parallel.ep_size=1",
        "tracking.enabled=false",
        "--launcher",
        "torchrun",
    ]
    proc = _run([*_turnout(), "train", "ast-gnn-moe", *resume], tmp_path, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "train.grad_accum 1 -> 2" in out  # the global batch of 8 functions kept
    assert summary_value(proc.stdout, "steps") == "6"
    final = summary_value(proc.stdout, "checkpoint")
    state, cfg, step = consolidated_state(final)
    assert step == 6 and cfg.launch.num_workers == 1
    experts = [v for k, v in state.items() if "experts" in k]
    assert experts and all(v.shape[0] == 4 for v in experts)

    proc = _run([*_turnout(), "eval", final], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(r"^f1\s+\d\.\d{4}", proc.stdout, re.MULTILINE), proc.stdout
    assert re.search(r"^exact_match\s+\d\.\d{4}", proc.stdout, re.MULTILINE), proc.stdout

    proc = _run([*_turnout(), "generate", final, "--prompt", "def "], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("turnout: error: checkpoint:"), proc.stderr
    assert "function-name model" in lines[-1]
