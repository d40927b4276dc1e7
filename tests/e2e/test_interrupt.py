"""Ctrl-C on ``turnout train``: every worker stops within seconds, one line, exit 130,
the MLflow run is KILLED, and no process of the job is left behind.

The interrupt is sent as a terminal sends it: SIGINT to the whole foreground process
group (the driver leads its own session here). The job's processes are every
descendant of the driver while it trains (Ray's GCS, raylet, the training workers).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RUN = [
    "train.steps=100000",
    "train.log_every=1",
    "train.eval_every=0",
    "train.warmup_steps=1",
    "train.micro_batch_size=2",
    "model.max_seq_len=32",
    "data.max_bytes=200000",
    "tracking.experiment=interrupt",
]
#: Ctrl-C to exit, and exit to the last process gone, at most (2 shared cores).
EXIT_WITHIN_S = 30.0
GONE_WITHIN_S = 10.0


def _training_run(db: Path, timeout: float) -> str:
    """The run id once the run logged a loss (training is under way)."""
    from mlflow import MlflowClient

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if db.exists():
            try:
                client = MlflowClient(tracking_uri=f"sqlite:///{db}")
                exp = client.get_experiment_by_name("interrupt")
                runs = client.search_runs([exp.experiment_id]) if exp else []
            except Exception:
                runs = []
            if runs and "loss" in runs[0].data.metrics:
                return str(runs[0].info.run_id)
        time.sleep(1.0)
    pytest.fail(f"training did not start within {timeout} s")


def _alive(procs: list[psutil.Process]) -> list[str]:
    left = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            continue
    return left


def test_ctrl_c_stops_every_process_and_marks_the_run_killed(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("RAY_ADDRESS", None)
    exe = str(Path(sys.executable).with_name("turnout"))
    train = subprocess.Popen(
        [exe, "train", "tiny", *RUN],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        run_id = _training_run(tmp_path / "mlflow.db", timeout=300)
        job = psutil.Process(train.pid).children(recursive=True)
        assert any("RayTrainWorker" in " ".join(p.cmdline()) for p in job), job
        t0 = time.monotonic()
        os.killpg(train.pid, signal.SIGINT)
        out, err = train.communicate(timeout=EXIT_WITHIN_S)
        exit_s = time.monotonic() - t0
    finally:
        if train.poll() is None:
            os.killpg(train.pid, signal.SIGKILL)
            train.wait()
    left = _alive(job)
    while left and time.monotonic() - t0 < exit_s + GONE_WITHIN_S:
        time.sleep(0.2)
        left = _alive(job)
    gone_s = time.monotonic() - t0
    print(f"Ctrl-C: driver exited after {exit_s:.1f} s, every job process gone after {gone_s:.1f} s")
    assert not left, f"left behind after {gone_s:.1f} s: {left}"
    assert train.returncode == 130, out + err
    assert "Traceback" not in out + err
    lines = [ln for ln in err.splitlines() if ln.startswith("turnout:")]
    assert len(lines) == 1 and lines[0].startswith("turnout: interrupted"), err
    run = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id)
    assert run.info.status == "KILLED"
