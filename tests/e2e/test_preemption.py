"""Preemption through the real CLI and Ray: SIGTERM to the driver, and to one worker.

- SIGTERM to ``turnout train`` (as Slurm, Kubernetes or a spot shutdown send it), on
  Ray and with ``--launcher torchrun``, with the next scheduled checkpoint far away:
  exit 143, one ``turnout:`` line naming the checkpoint and the command that resumes
  it, a complete checkpoint at the step every rank stopped after (no step lost), the
  MLflow run KILLED with a ``stop_reason`` tag, and no process of the job (or of its
  Ray session) left. Under torchrun, the same command with ``train.resume=auto`` then
  continues from that step, in the same MLflow run (every step's loss logged once), to
  the uninterrupted run's final parameters (CPU, fp32, same seed: bit-equal, as in
  tests/e2e/test_chaos_soak.py). Resuming is the launcher's and the worker's, the same
  code under both launchers (``launch/cli.py``, ``trainer/resume/auto.py``), and the
  Ray path's resume from a checkpoint is the worker test's below: so it is run once,
  under the launcher that starts in seconds.
- SIGTERM to one training worker: every rank stops after the same step and saves it;
  Ray restarts the workers, which resume from that checkpoint with no step to train
  again, and the job ends with the uninterrupted run's parameters.

The moment to signal is read from the run folder's ``recovery.json`` (rank 0 rewrites
it after every step). The job's processes: the driver's descendants while it trains,
and any process whose command line names its Ray session.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.jobs import (
    JOB,
    STEPS,
    assert_same_params,
    finish,
    our_lines,
    ray_workers,
    reaped,
    recovery_record,
    start_train,
    summary_value,
    wait_for_record,
)
from turnout.trainer.checkpointing.manifest import is_complete

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SIGNAL_AFTER = 8
RUN = [
    *JOB,
    f"train.ckpt_every={STEPS * 10}",  # no scheduled checkpoint before the end
    "tracking.experiment=preempt",
    # Room for the stop on a loaded 2-core machine: the test is about what happens, not
    # how fast (the sized default is tests/unit/test_preempt.py's).
    "launch.preempt_grace_s=600",
]


def _session(job: list[psutil.Process]) -> str:
    """The Ray session name on the job's processes' command lines."""
    for p in job:
        try:
            m = re.search(r"session_\d{4}-[\d_-]+", " ".join(p.cmdline()))
        except psutil.Error:
            continue
        if m:
            return m.group(0)
    pytest.fail("no Ray session among the job's processes")


def _alive(job: list[psutil.Process], session: str) -> list[str]:
    """The job's processes still running: its known ones, and any naming its session."""
    left = {}
    for p in [*job, *psutil.process_iter()]:
        try:
            line = " ".join(p.cmdline())
            if p.status() == psutil.STATUS_ZOMBIE or not p.is_running():
                continue
            if p in job or (session and session in line):
                left[p.pid] = line[:120]
        except psutil.Error:
            continue
    return [f"{pid} {line}" for pid, line in left.items()]


@pytest.mark.parametrize("launcher", ["ray", "torchrun"])
def test_sigterm_to_the_driver_checkpoints_and_auto_resumes(
    tmp_path: Path, uninterrupted: str, launcher: str
) -> None:
    from mlflow import MlflowClient

    run_args = [*RUN, "--launcher", launcher]
    with reaped(start_train(tmp_path, run_args)) as proc:
        at = wait_for_record(
            lambda r: r["step"] >= SIGNAL_AFTER, proc, tmp_path, 300, f"step {SIGNAL_AFTER}"
        )
        job = psutil.Process(proc.pid).children(recursive=True)
        rank = "RayTrainWorker" if launcher == "ray" else "turnout.launch.worker"
        assert any(rank in " ".join(p.cmdline()) for p in job), job
        session = _session(job) if launcher == "ray" else ""
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)  # the driver alone, as `kill` or Kubernetes do
        out, err = proc.communicate(timeout=300)
        exit_s = time.monotonic() - t0
    assert proc.returncode == 143, out + err
    assert "Traceback" not in out + err and "SIGTERM received" not in err
    lines = our_lines(err)
    assert len(lines) == 1 and lines[0].startswith("turnout: terminated (SIGTERM): "), err
    m = re.search(r"stopped after step (\d+) and saved (\S+) in", lines[0])
    assert m, lines[0]
    stopped, folder = int(m.group(1)), Path(m.group(2))
    assert "train.resume=auto" in lines[0]
    # The checkpoint is complete and holds the last step done: no step lost.
    assert SIGNAL_AFTER <= at["step"] <= stopped < STEPS
    assert folder.name == f"step{stopped}" and is_complete(folder)
    assert (recovery_record(tmp_path) or {})["step"] == stopped
    left = _alive(job, session)
    print(
        f"preemption: SIGTERM after step {at['step']} -> exit 143 in {exit_s:.1f} s, "
        f"stopped after step {stopped} with its checkpoint, 0 steps lost"
    )
    assert not left, f"left behind: {left}"
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("preempt").experiment_id])
    assert run.info.status == "KILLED"
    assert run.data.tags["stop_reason"] == "SIGTERM to the launcher"

    if launcher != "torchrun":
        return  # resuming: see the module doc
    # A scheduler re-runs the same command line: it continues from that step.
    out, err = finish(start_train(tmp_path, [*run_args, "train.resume=auto"]), 900)
    assert f"turnout: train.resume=auto: resuming {folder} " in out, out + err
    assert summary_value(out, "steps") == str(STEPS)
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in losses) == list(range(1, STEPS + 1))  # each step once
    assert_same_params(summary_value(out, "checkpoint"), uninterrupted)


def test_sigterm_to_a_worker_checkpoints_and_restarts_with_nothing_redone(
    tmp_path: Path, uninterrupted: str
) -> None:
    proc = start_train(tmp_path, [*RUN, "launch.max_failures=1"])
    at = wait_for_record(
        lambda r: r["step"] >= SIGNAL_AFTER, proc, tmp_path, 300, f"step {SIGNAL_AFTER}"
    )
    workers = ray_workers(proc)
    assert len(workers) == 2, workers
    t0 = time.monotonic()
    os.kill(max(workers, key=lambda p: p.pid).pid, signal.SIGTERM)
    wait_for_record(
        lambda r: r["attempt"] == 1 and r["step"] > r["restarts"][-1]["from_step"],
        proc,
        tmp_path,
        300,
        "a training step after the restart",
    )
    resume_s = time.monotonic() - t0
    out, err = finish(proc, 900)
    assert proc.returncode == 0, out + err
    assert "Traceback" not in out + err and "SIGTERM received" not in err
    (restart,) = (recovery_record(tmp_path) or {})["restarts"]
    print(
        f"worker preemption: SIGTERM after step {at['step']} -> checkpoint of step "
        f"{restart['from_step']}, first step after the restart {resume_s:.1f} s later, "
        f"{restart['failed_at'] - restart['from_step']} steps redone"
    )
    assert restart["failed_at"] == restart["from_step"] >= at["step"], restart
    assert Path(restart["resumed_from"]).name == f"step{restart['from_step']}"
    assert summary_value(out, "restarts") == "1"
    assert summary_value(out, "steps redone") == "0"
    assert_same_params(summary_value(out, "checkpoint"), uninterrupted)
