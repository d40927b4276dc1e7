"""Tracking is rank-0 only and inert when disabled; helpers for the store."""

from __future__ import annotations

from pathlib import Path

import pytest

from turnout.config import TurnoutConfig
from turnout.trainer.tracking import Tracker, git_commit, sqlite_artifact_root

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


def test_sqlite_artifacts_live_beside_the_database(tmp_path: Path) -> None:
    root = sqlite_artifact_root(f"sqlite:///{tmp_path / 'x' / 'mlflow.db'}")
    assert root == (tmp_path / "x" / "mlartifacts").as_uri()
    assert sqlite_artifact_root("http://mlflow.example:5000") is None
