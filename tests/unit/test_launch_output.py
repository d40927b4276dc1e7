"""What the launcher prints: Ray's log filter and the end-of-run summary."""

from __future__ import annotations

import io
import math
import sys

import pytest

from turnout.config.load import load_config
from turnout.launch.ray.logs import WorkerLogPrinter
from turnout.launch.summary import format_summary
from turnout.launch.worker import result_to_dict

pytestmark = pytest.mark.unit


def _feed(printer: WorkerLogPrinter, lines: list[str], actor: str = "RayTrainWorker") -> None:
    printer({"actor_name": actor, "is_err": False, "lines": lines, "pid": 1})


def test_log_printer_keeps_worker_output_and_drops_ray_chatter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    p = WorkerLogPrinter()
    _feed(p, ["Requesting resources: {'CPU': 1} * 2"], actor="TrainController")
    _feed(p, ["Setting up process group for: env:// [rank=0, world_size=2]"])
    _feed(p, ["step 100: val_loss 2.7 (unigram entropy 3.3)"])
    _feed(p, ["Error in training function:", "Traceback (most recent call last):", "  x", ""])
    _feed(p, ["\rtrain:  10%| 1/10\rtrain:  20%| 2/10"])
    p.close()
    assert out.getvalue() == "step 100: val_loss 2.7 (unigram entropy 3.3)\n"
    # Not a terminal: the latest redraw of the bar, as a plain line.
    assert err.getvalue() == "train:  20%| 2/10\n"


def test_summary_names_losses_entropy_and_the_ui() -> None:
    cfg = load_config("tiny")
    res = {
        "final_train_loss": 2.1,
        "final_val_loss": 2.4,
        "final_val_loss_causal": math.nan,
        "unigram_entropy": 3.2,
        "steps": 200,
        "tokens_per_s": 8000.0,
        "wall_s": 100.0,
        "run_id": "abc",
        "checkpoint": "/c",
    }
    text = format_summary(cfg, res)
    assert "final val loss         2.4000 nats/byte  (75% of the unigram entropy)" in text
    assert "corpus unigram entropy 3.2000" in text
    assert "MLflow run id          abc" in text
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in text
    assert "causal" not in text  # NaN: no MoD line
    assert result_to_dict(None) == {}


def test_summary_shows_flops_mfu_and_memory() -> None:
    cfg = load_config("tiny")
    res = {
        "final_val_loss": 2.4,
        "unigram_entropy": 3.2,
        "flops_per_token": 3.0e6,
        "dense_flops_per_token": 5.0e6,
        "train_flops": 1.234e12,
        "tflops": 0.12,
        "peak_tflops": 0.1,
        "peak_measured": True,
        "mfu": 0.6,
        "peak_memory_mb": [812.4, 790.0],
        "memory_kind": "max RSS",
    }
    text = format_summary(cfg, res)
    assert "FLOPs per token        3.00 M train (3x forward), 0.60 of the equal-shape" in text
    assert "dense model's 5.00 M" in text
    assert "training FLOPs         1.234e+12" in text
    assert "achieved               0.12 TFLOP/s, MFU 60.0% of 2 x 0.1 TFLOP/s (measured)" in text
    assert "peak memory per rank   812, 790 MiB (max RSS)" in text
    # A result without the accounting (an older worker) prints none of those lines.
    bare = format_summary(cfg, {"final_val_loss": 2.4, "unigram_entropy": 3.2})
    assert "FLOPs" not in bare and "MFU" not in bare and "memory" not in bare
