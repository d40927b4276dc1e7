"""Automatic recovery through the real CLI and Ray: a training worker SIGKILLed mid-run.

With ``launch.max_failures`` > 0 Ray Train restarts the worker group; the new attempt
resumes from the newest checkpoint of the job's run folder by itself, the job exits 0,
its final parameters equal an uninterrupted run's (CPU, fp32, same seed), the summary
counts the restart and the steps redone, and the one MLflow run carries on. With
``launch.max_failures=0`` the same kill fails the job with one line.

The victim is found in the process table (a ``ray::RayTrainWorker`` descendant of the
driver); the moment to kill is read from the run folder's ``recovery.json`` (rank 0
rewrites it after every step).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.jobs import (
    JOB,
    STEPS,
    assert_same_params,
    finish,
    recovery_record,
    start_train,
    summary_value,
    wait_for_record,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CKPT_EVERY, KILL_AFTER = 8, 10
RUN = [*JOB, f"train.ckpt_every={CKPT_EVERY}", "tracking.experiment=recovery"]


def _start(cwd: Path, extra: list[str]) -> subprocess.Popen:
    return start_train(cwd, [*RUN, *extra])


def _kill_a_worker(proc: subprocess.Popen, cwd: Path) -> tuple[float, int]:
    """SIGKILL one training worker once step KILL_AFTER is done; (when, its step)."""
    record = wait_for_record(
        lambda r: r["step"] >= KILL_AFTER, proc, cwd, 300, f"step {KILL_AFTER}"
    )
    job = psutil.Process(proc.pid).children(recursive=True)
    workers = [p for p in job if "RayTrainWorker" in " ".join(p.cmdline())]
    assert len(workers) == 2, [" ".join(p.cmdline()) for p in job]
    victim = max(workers, key=lambda p: p.pid)
    os.kill(victim.pid, signal.SIGKILL)
    return time.monotonic(), int(record["step"])


def test_a_killed_worker_restarts_from_the_newest_checkpoint(
    tmp_path: Path, uninterrupted: str
) -> None:
    from mlflow import MlflowClient

    killed = tmp_path

    proc = _start(killed, ["launch.max_failures=2"])
    t_kill, step_at_kill = _kill_a_worker(proc, killed)
    resumed = wait_for_record(
        lambda r: r["attempt"] == 1 and r["step"] > r["restarts"][-1]["from_step"],
        proc,
        killed,
        300,
        "training step after the restart",
    )
    resume_s = time.monotonic() - t_kill
    out, err = finish(proc, 400)
    assert proc.returncode == 0, out + err
    assert "Traceback" not in out + err
    (restart,) = resumed["restarts"]
    print(
        f"recovery: kill -> first step after the restart {resume_s:.1f} s; "
        f"killed after step {restart['failed_at']}, resumed from step {restart['from_step']}"
    )
    # The newest checkpoint at the kill (a later one only if the kill came late).
    assert restart["from_step"] % CKPT_EVERY == 0
    assert restart["from_step"] >= (step_at_kill // CKPT_EVERY) * CKPT_EVERY
    assert restart["failed_at"] >= step_at_kill
    redone = restart["failed_at"] - restart["from_step"]
    assert 0 <= redone <= CKPT_EVERY
    assert summary_value(out, "restarts") == "1"
    assert summary_value(out, "steps redone") == str(redone)
    assert f"turnout: restart 1: a worker failed after step {restart['failed_at']}" in out
    assert (recovery_record(killed) or {})["step"] == STEPS

    # The same MLflow run carried on and says where it resumed.
    client = MlflowClient(tracking_uri=f"sqlite:///{killed / 'mlflow.db'}")
    exp = client.get_experiment_by_name("recovery")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_id == summary_value(out, "MLflow run id")
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumed_from"] == restart["resumed_from"]
    assert run.data.tags["restarts"] == "1"
    assert run.data.metrics["steps_redone"] == redone
    # Each step's loss once: the steps trained again after the restart are not logged
    # twice (trainer/tracking/tracker.py).
    logged = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
    assert logged == list(range(1, STEPS + 1))

    # The same job, never interrupted, ends with the same parameters.
    assert_same_params(summary_value(out, "checkpoint"), uninterrupted)


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
