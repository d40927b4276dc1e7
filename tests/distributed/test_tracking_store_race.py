"""Runs started at once in one folder do not race on a fresh MLflow store: each opens
its own run in the one sqlite database (created once, under the store's file lock).

Without the lock, three processes reaching a fresh store together all failed in the
store's schema migration (alembic: 'expected to match one row ... 0 found').
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed

PROCESSES = 3
_SCRIPT = """
import sys, time
from turnout.config.load import load_config
from turnout.trainer.tracking.store import open_run
import mlflow  # imported before the start line, so the processes meet the store together
cfg = load_config("tiny", [f"tracking.uri=sqlite:///{sys.argv[1]}", "tracking.experiment=race"])
while time.time() < float(sys.argv[2]):
    time.sleep(0.005)
print(open_run(cfg, 2))
"""


def test_concurrent_runs_share_a_fresh_store(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    db = tmp_path / "mlflow.db"
    start = time.time() + 15  # after every process has imported MLflow
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _SCRIPT, str(db), str(start)],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(PROCESSES)
    ]
    outputs = [p.communicate(timeout=240) for p in procs]
    for p, (_out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    run_ids = [out.strip().splitlines()[-1] for out, _ in outputs]
    assert len(set(run_ids)) == PROCESSES
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("race")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    found = {r.info.run_id for r in client.search_runs([exp.experiment_id])}
    assert found == set(run_ids)
