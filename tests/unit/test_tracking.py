"""Tracking is rank-0 only and inert when disabled; helpers for the store."""

from __future__ import annotations

from pathlib import Path

import pytest

from turnout.config import TurnoutConfig
from turnout.trainer.tracking.tracker import Tracker, git_commit

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("enabled, rank", [(False, 0), (True, 1)])
def test_inactive_tracker_touches_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, enabled: bool, rank: int
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = TurnoutConfig()
    cfg.tracking.enabled = enabled
    tracker = Tracker(cfg, rank=rank, world_size=2)
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.finish()
    assert tracker.run_id == ""
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, no mlruns/


def test_git_commit_outside_a_checkout_is_unknown(tmp_path: Path) -> None:
    assert git_commit(tmp_path) == "unknown"


def _cfg(tmp_path: Path, *overrides: str) -> TurnoutConfig:
    from turnout.config.load import load_config

    return load_config(
        "tiny",
        [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment=u", *overrides],
    )


def _client(tmp_path: Path):  # noqa: ANN202
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")


def test_owner_opens_logs_and_ends_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    tracker = Tracker(_cfg(tmp_path), rank=0, world_size=2)
    for step in (1, 2, 3):
        tracker.log_metrics({"loss": 4.0 - step, "bad": float("nan")}, step=step)
    tracker.log_checkpoint(str(tmp_path / "ckpt" / "step1"), 1)
    tracker.log_checkpoint(str(tmp_path / "ckpt" / "step3"), 3, pruned=["step1"])
    tracker.finish("FAILED")
    client = _client(tmp_path)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(tracker.run_id, "loss")] == [1, 2, 3]
    assert "bad" not in run.data.metrics
    assert run.data.tags["checkpoint/latest_step"] == "3"
    assert run.data.tags["checkpoint/step3"] == str(tmp_path / "ckpt" / "step3")
    # Retention deleted step1 when step3 was saved: its tag no longer names a folder.
    assert run.data.tags["checkpoint/step1"] == f"pruned: {tmp_path / 'ckpt' / 'step1'}"
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.data.params["model.moe.num_experts"] == "4"


def test_attached_tracker_leaves_the_status_to_the_launcher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from turnout.launch.tracked_run import open_tracked_run

    monkeypatch.chdir(tmp_path)
    cfg = _cfg(tmp_path)
    tracked = open_tracked_run(cfg)
    tracker = Tracker(cfg, rank=0, world_size=2, attach_to=tracked.run_id)
    assert tracker.run_id == tracked.run_id
    tracker.log_metrics({"loss": 1.5}, step=7)
    tracker.finish("FINISHED")
    client = _client(tmp_path)
    assert client.get_run(tracked.run_id).info.status == "RUNNING"
    tracked.end("KILLED")
    run = client.get_run(tracked.run_id)
    assert run.info.status == "KILLED" and run.data.metrics["loss"] == 1.5


def test_resume_appends_to_the_checkpoints_run(tmp_path: Path) -> None:
    from turnout.errors import RunError
    from turnout.trainer.checkpointing.files import META_FILE
    from turnout.trainer.tracking.store import end_run, open_run, previous_run_id, record_run_id

    first = open_run(_cfg(tmp_path), 2)
    assert end_run(f"sqlite:///{tmp_path / 'mlflow.db'}", first, "KILLED", 30) == ""
    step = tmp_path / "ckpt" / "run-x" / "step3"
    step.mkdir(parents=True)
    (step / META_FILE).write_bytes(b"")  # what makes a folder a checkpoint step
    assert previous_run_id(str(step)) == ""
    record_run_id(step.parent, first)
    assert previous_run_id(str(step)) == first
    again = open_run(_cfg(tmp_path, f"train.resume={step}"), 2)
    assert again == first
    run = _client(tmp_path).get_run(first)
    assert run.info.status == "RUNNING"
    assert run.data.tags["resumed_from"] == str(step)
    with pytest.raises(RunError, match="tracking.run_id"):
        open_run(_cfg(tmp_path, "tracking.run_id=0123456789abcdef"), 2)


def test_an_attempt_that_carries_on_a_run_logs_each_step_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restarted or resumed attempt trains again the steps after its checkpoint: the
    store keeps the values of the step series the first attempt logged (each step once),
    per key; what an attempt logs of itself (a restart counter) is always taken."""
    monkeypatch.chdir(tmp_path)
    cfg = _cfg(tmp_path)
    first = Tracker(cfg, rank=0, world_size=2)
    for step in range(1, 11):
        first.log_metrics({"loss": float(step)}, step=step, once=True)
    first.log_metrics({"val_loss": 5.0, "restarts": 0.0}, step=6, once=True)
    first.finish("KILLED")
    again = Tracker(cfg, rank=0, world_size=2, attach_to=first.run_id)
    again.log_metrics({"restarts": 1.0}, step=8)  # resumed from step 8
    for step in range(9, 13):
        again.log_metrics({"loss": 100.0 + step, "val_loss": 50.0}, step=step, once=True)
    again.finish()
    client = _client(tmp_path)
    loss = client.get_metric_history(first.run_id, "loss")
    assert [(m.step, m.value) for m in loss] == [(s, float(s)) for s in range(1, 11)] + [
        (11, 111.0),
        (12, 112.0),
    ]
    assert [m.step for m in client.get_metric_history(first.run_id, "val_loss")] == [
        6,
        9,
        10,
        11,
        12,
    ]
    assert [m.step for m in client.get_metric_history(first.run_id, "restarts")] == [6, 8]
