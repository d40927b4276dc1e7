"""How ``turnout train`` ends when it does not finish, and what MLflow says about it.

- Ctrl-C: every worker stops within seconds, one line, exit 130, the MLflow run is
  KILLED, and no process of the job is left behind.
- A diverging run (train.lr=50: DeepSpeed skips step after step for non-finite
  gradients while the loss stays finite) stops with one line naming
  ``train.max_consecutive_skipped_steps``, the failing rank and its log, exit 1, and
  the run is FAILED.
- ``--launcher torchrun`` with rank 0 SIGKILLed: the launcher marks the run FAILED.

The interrupt is sent as a terminal sends it: SIGINT to the whole foreground process
group (the driver leads its own session here). The job's processes are every
descendant of the driver while it trains (Ray's GCS, raylet, the training workers).
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
from pathlib import Path

import psutil
import pytest

from tests.jobs import our_lines

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


def _start(tmp_path: Path, args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """``turnout train ARGS`` in ``tmp_path``, leading its own session (a terminal's job)."""
    exe = str(Path(sys.executable).with_name("turnout"))
    return subprocess.Popen(
        [exe, "train", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _training_run(db: Path, timeout: float, train: subprocess.Popen) -> str:
    """The run id once the run logged a loss (training is under way).

    The poll opens the store under turnout's own store lock: an MLflow client that opens a
    store creates its tables when they are missing, and one that did so while the driver
    was still creating them left a store without the driver's experiment (training never
    started, seen once in six fresh-clone runs)."""
    from mlflow import MlflowClient

    from turnout.trainer.tracking.store import store_lock

    uri = f"sqlite:///{db}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if train.poll() is not None:
            out, err = train.communicate()
            pytest.fail(f"turnout train exited ({train.returncode}) first:\n{(out + err)[-3000:]}")
        if db.exists():
            try:
                with store_lock(uri):
                    client = MlflowClient(tracking_uri=uri)
                    exp = client.get_experiment_by_name("interrupt")
                    runs = client.search_runs([exp.experiment_id]) if exp else []
            except Exception:
                runs = []
            if runs and "loss" in runs[0].data.metrics:
                return str(runs[0].info.run_id)
        time.sleep(1.0)
    os.killpg(train.pid, signal.SIGKILL)
    out, err = train.communicate()
    pytest.fail(f"training did not start within {timeout} s:\n{(out + err)[-3000:]}")


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
    train = _start(tmp_path, ["tiny", *RUN], env)
    try:
        run_id = _training_run(tmp_path / "mlflow.db", 300, train)
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
    print(
        f"Ctrl-C: driver exited after {exit_s:.1f} s, every job process gone after {gone_s:.1f} s"
    )
    assert not left, f"left behind after {gone_s:.1f} s: {left}"
    assert train.returncode == 130, out + err
    assert "Traceback" not in out + err
    lines = our_lines(err)
    assert len(lines) == 1 and lines[0].startswith("turnout: interrupted"), err
    run = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id)
    assert run.info.status == "KILLED"


def test_diverging_run_stops_with_one_line_and_a_failed_run(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("RAY_ADDRESS", None)
    exe = str(Path(sys.executable).with_name("turnout"))
    args = [
        "train.steps=40",
        "train.lr=50",
        "train.min_lr=1",
        "train.max_consecutive_skipped_steps=3",
        *[a for a in RUN if not a.startswith(("train.steps", "tracking.experiment"))],
        "tracking.experiment=diverge",
    ]
    proc = subprocess.run(
        [exe, "train", "tiny", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("turnout: error:")]
    assert len(errors) == 1, proc.stderr
    assert "optimizer steps in a row skipped" in errors[0]
    assert "train.max_consecutive_skipped_steps=3" in errors[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    # The worker's error came back through Ray as data: the failing rank and its log,
    # which holds the traceback the line leaves out.
    m = re.match(
        r"turnout: error: training failed on rank (\d): .* \(traceback: (\S+)\)$", errors[0]
    )
    assert m, errors[0]
    log = Path(m.group(2))
    assert log.name == f"rank{m.group(1)}.log"
    assert "SkippedStepsError" in log.read_text()
    # Final: not retried, though launch.max_failures allows restarts (its default, 3).
    assert "turnout: restart" not in proc.stdout
    (record,) = (tmp_path / "checkpoints").glob("*/recovery.json")
    assert json.loads(record.read_text())["attempt"] == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("diverge")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FAILED"
    assert run.data.metrics["skipped_steps"] >= 1  # logged before the stop


def test_torchrun_rank_killed_marks_the_run_failed(tmp_path: Path) -> None:
    """``--launcher torchrun``: the launcher owns the MLflow run, so even a SIGKILLed
    rank 0 (which cannot end its own run) leaves it FAILED, not RUNNING forever."""
    from mlflow import MlflowClient

    env = dict(os.environ, PYTHONWARNINGS="ignore")
    train = _start(tmp_path, ["tiny", *RUN, "--launcher", "torchrun"], env)
    try:
        run_id = _training_run(tmp_path / "mlflow.db", 300, train)
        # torchrun's ranks: the processes it gave a RANK (not torchrun itself).
        ranks = {}
        for p in psutil.Process(train.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "RANK" in p.environ() and "turnout.launch.worker" in " ".join(p.cmdline()):
                    ranks[p.environ()["RANK"]] = p
        assert sorted(ranks) == ["0", "1"], ranks
        rank0 = [ranks["0"]]
        rank0[0].kill()
        out, err = train.communicate(timeout=120)
    finally:
        if train.poll() is None:
            os.killpg(train.pid, signal.SIGKILL)
            train.wait()
    assert train.returncode not in (0, 130), out + err
    run = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(run_id)
    assert run.info.status == "FAILED"
