"""What the launcher prints: failure reasons in one line, Ray's log filter, the summary."""

from __future__ import annotations

import io
import math
import sys

import pytest

from turnout.config.load import load_config
from turnout.launch.ray_launch import WorkerFailed, _failure_reason, _WorkerLogPrinter
from turnout.launch.worker import format_summary, one_line, result_to_dict

pytestmark = pytest.mark.unit


def test_worker_group_error_becomes_one_line() -> None:
    from ray.train.v2.api.exceptions import WorkerGroupError

    msg = "rank 1: NonFiniteLossError: non-finite loss at step 3 (traceback: /t/rank1.log)"
    err = WorkerGroupError("boom\nmore", {1: RuntimeError(msg), 0: RuntimeError("rank 0: x")})
    assert _failure_reason(err) == "rank 0: x"
    err = WorkerGroupError("boom", {1: RuntimeError(msg)})
    reason = _failure_reason(err)
    assert reason == msg
    assert WorkerFailed(reason).config_error is None


def test_foreign_worker_error_keeps_its_last_line() -> None:
    from ray.train.v2.api.exceptions import WorkerGroupError

    text = "Traceback (most recent call last):\n  File x\nOSError: disk full"
    assert _failure_reason(WorkerGroupError("b", {2: RuntimeError(text)})) == (
        "rank 2: OSError: disk full"
    )


def test_config_error_on_a_worker_is_still_a_config_error() -> None:
    e = WorkerFailed("rank 0: ConfigError: data.corpus: too small (traceback: /t/rank0.log)")
    assert e.config_error == "data.corpus: too small"


def test_one_line_takes_the_first_line() -> None:
    assert one_line(ValueError("first\nsecond")) == "ValueError: first"
    assert one_line(KeyError()) == "KeyError"


def _feed(printer: _WorkerLogPrinter, lines: list[str], actor: str = "RayTrainWorker") -> None:
    printer({"actor_name": actor, "is_err": False, "lines": lines, "pid": 1})


def test_log_printer_keeps_worker_output_and_drops_ray_chatter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    p = _WorkerLogPrinter()
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
