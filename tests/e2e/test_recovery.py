"""Automatic recovery through the real CLI and Ray: a training worker SIGKILLed mid-run
with ``launch.max_failures=0`` fails the job with one line naming the dead worker.

With restarts allowed, the same kill is the first event of the chaos soak
(tests/e2e/test_chaos_soak.py): Ray restarts the worker group, which resumes from the
newest checkpoint before the kill, and the run ends bit-equal to an uninterrupted one
with each step's loss logged once; a restarted job that finishes, with its summary
counting the restart, is tests/e2e/test_preemption.py's worker test.

The victim is found in the process table (a ``ray::RayTrainWorker`` descendant of the
driver); the moment to kill is read from the run folder's ``recovery.json`` (rank 0
rewrites it after every step)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.jobs import (
    JOB,
    finish,
    ray_workers,
    recovery_record,
    start_train,
    wait_for_record,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CKPT_EVERY, KILL_AFTER = 8, 10
RUN = [*JOB, f"train.ckpt_every={CKPT_EVERY}", "tracking.experiment=recovery"]


def _start(cwd: Path, extra: list[str]) -> subprocess.Popen:
    return start_train(cwd, [*RUN, *extra])


def _kill_a_worker(proc: subprocess.Popen, cwd: Path) -> None:
    """SIGKILL one training worker once step KILL_AFTER is done."""
    wait_for_record(lambda r: r["step"] >= KILL_AFTER, proc, cwd, 300, f"step {KILL_AFTER}")
    workers = ray_workers(proc)
    assert len(workers) == 2, workers
    os.kill(max(workers, key=lambda p: p.pid).pid, signal.SIGKILL)


def test_without_restarts_a_killed_worker_fails_the_job_in_one_line(tmp_path: Path) -> None:
    proc = _start(tmp_path, ["launch.max_failures=0"])
    _kill_a_worker(proc, tmp_path)
    out, err = finish(proc, 120)
    assert proc.returncode == 1, out + err
    assert "Traceback" not in out + err
    errors = [ln for ln in err.splitlines() if ln.startswith("turnout: error:")]
    assert len(errors) == 1, err
    assert "launch.max_failures=0" in errors[0]
    assert "worker logs:" in errors[0]  # the dead worker is named, not a peer's echo
    assert "turnout: restart" not in out
    assert (recovery_record(tmp_path) or {}).get("attempt") == 0
