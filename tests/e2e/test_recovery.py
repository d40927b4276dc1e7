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
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from tests.jobs import (
    finish,
    job_env,
    recovery_record,
    start_train,
    summary_value,
    turnout_exe,
    wait_for_record,
)
from turnout.trainer.weights.from_checkpoint import consolidated_state

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STEPS, CKPT_EVERY, KILL_AFTER = 60, 10, 25
RUN = [
    f"train.steps={STEPS}",
    f"train.ckpt_every={CKPT_EVERY}",
    "train.log_every=1",
    "train.eval_every=0",
    "train.warmup_steps=1",
    "train.micro_batch_size=2",
    "train.precision=fp32",
    "model.max_seq_len=32",
    "data.max_bytes=200000",
    "launch.num_workers=2",
    "tracking.experiment=recovery",
]


def _start(cwd: Path, extra: list[str]) -> subprocess.Popen:
    return start_train(cwd, ["tiny", *RUN, *extra])


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


def test_a_killed_worker_restarts_from_the_newest_checkpoint(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    killed, uninterrupted = tmp_path / "killed", tmp_path / "uninterrupted"
    killed.mkdir()
    uninterrupted.mkdir()

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
    logged = {m.step for m in client.get_metric_history(run.info.run_id, "loss")}
    assert logged == set(range(1, STEPS + 1))

    # The same job, never interrupted: the same final parameters.
    ref = subprocess.run(
        [turnout_exe(), "train", "tiny", *RUN],
        cwd=uninterrupted,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert ref.returncode == 0, ref.stdout + ref.stderr
    assert not re.search(r"^\s+restarts\s", ref.stdout, re.MULTILINE), ref.stdout
    got, _, got_step = consolidated_state(summary_value(out, "checkpoint"))
    want, _, want_step = consolidated_state(summary_value(ref.stdout, "checkpoint"))
    assert got_step == want_step == STEPS
    assert got.keys() == want.keys()
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, different[:5]


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
