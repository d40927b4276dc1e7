"""A ``turnout train`` job as a real subprocess, for the e2e tests that signal or kill it.

Shared by the recovery, preemption and chaos-soak tests (tests/e2e/): start the job in
its own session (so it can be killed as a group), read its recovery record while it
runs, wait for a condition on it, collect its output, read its summary, and compare
its final parameters with those of the same job never interrupted (trained once per
test session: tests/conftest.py's ``uninterrupted`` fixture).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import torch

from turnout.trainer.resume.recovery import RECOVERY_FILE
from turnout.trainer.weights.from_checkpoint import consolidated_state

#: The job the recovery and preemption tests interrupt: ``tiny`` on 2 CPU workers, fp32,
#: ``STEPS`` steps. Where it checkpoints, and into which experiment, is each test's; the
#: parameters it ends with are not (the uninterrupted run, :func:`uninterrupted_run`).
STEPS = 24
JOB = [
    "tiny",
    f"train.steps={STEPS}",
    "train.log_every=1",
    "train.eval_every=0",
    "train.warmup_steps=1",
    "train.micro_batch_size=2",
    "train.precision=fp32",
    "model.max_seq_len=32",
    "data.max_bytes=200000",
    "launch.num_workers=2",
]


def turnout_exe() -> str:
    """The ``turnout`` command of this interpreter's environment."""
    return str(Path(sys.executable).with_name("turnout"))


def job_env() -> dict[str, str]:
    """This environment, without a Ray address to join and without Python's warnings."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("RAY_ADDRESS", None)
    return env


def start_train(cwd: Path, args: list[str]) -> subprocess.Popen:
    """``turnout train ARGS`` in ``cwd``, in a session of its own, output piped."""
    return subprocess.Popen(
        [turnout_exe(), "train", *args],
        cwd=cwd,
        env=job_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@contextlib.contextmanager
def reaped(proc: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """The job, killed (its whole group) if it is still running when the block ends (a
    failed wait, a timeout)."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """(stdout, stderr) of the job once it ends; killed (its whole group) past ``timeout``."""
    with reaped(proc):
        return proc.communicate(timeout=timeout)


def ray_workers(proc: subprocess.Popen) -> list[psutil.Process]:
    """The job's Ray Train workers (``ray::RayTrainWorker`` descendants of the driver)."""
    job = psutil.Process(proc.pid).children(recursive=True)
    return [p for p in job if "RayTrainWorker" in " ".join(p.cmdline())]


def our_lines(stderr: str) -> list[str]:
    """The job's ``turnout:`` lines but the kernel build's wait (a worker may wait on
    another's build)."""
    return [
        ln
        for ln in stderr.splitlines()
        if ln.startswith("turnout:") and not ln.startswith("turnout: waiting for the csrc/")
    ]


def recovery_record(cwd: Path) -> dict | None:
    """The job's recovery record (the newest under ``cwd/checkpoints``: a resumed job
    writes into a run folder of its own), None before it exists."""
    found = []
    for path in (cwd / "checkpoints").glob(f"*/{RECOVERY_FILE}"):
        try:
            found.append((path.stat().st_mtime_ns, path))
        except OSError:
            continue
    if not found:
        return None
    try:
        return json.loads(max(found)[1].read_text())
    except (OSError, ValueError):  # replaced while read: read again
        return None


def wait_for_record(
    cond: Callable[[dict], bool], proc: subprocess.Popen, cwd: Path, timeout: float, what: str
) -> dict:
    """The job's recovery record once ``cond`` holds for it (polled every 50 ms); fails the
    test, with the job's last stderr, when the job ends first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = recovery_record(cwd)
        if record is not None and cond(record):
            return record
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"the job ended (exit {proc.returncode}) before {what}:\n{err[-3000:]}")
        time.sleep(0.05)
    pytest.fail(f"no {what} within {timeout} s")


def summary_value(stdout: str, label: str) -> str:
    """The value after ``label`` in the job's closing summary."""
    m = re.search(rf"^\s+{re.escape(label)}\s+(\S+)", stdout, re.MULTILINE)
    assert m, f"no {label!r} in:\n{stdout}"
    return m.group(1)


def uninterrupted_run(cwd: Path) -> str:
    """The final checkpoint of :data:`JOB`, trained without interruption in ``cwd``.

    Under ``--launcher torchrun`` (~13 s here, Ray ~29 s): both launchers run the same
    worker entry on the same 2-rank gloo group and end bit-equal, which the interrupted
    jobs of both launchers check against this one."""
    args = [*JOB, "tracking.enabled=false", "--launcher", "torchrun"]
    out, err = finish(start_train(cwd, args), 900)
    assert "terminated" not in err and "restart" not in out, out + err
    return summary_value(out, "checkpoint")


def assert_same_params(got_ckpt: str, want_ckpt: str) -> None:
    """Both checkpoints hold step :data:`STEPS` and bit-equal parameters (CPU, fp32, the
    same seed: an interrupted job that lost or redid nothing ends exactly the same)."""
    got, _, got_step = consolidated_state(got_ckpt)
    want, _, want_step = consolidated_state(want_ckpt)
    assert got_step == want_step == STEPS
    assert got.keys() == want.keys()
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, different[:5]
