"""Tracking is rank-0 only and inert when disabled; helpers for the store."""

from __future__ import annotations

from pathlib import Path

import pytest

from turnout.config import TurnoutConfig
from turnout.trainer.tracking import Tracker, git_commit

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
