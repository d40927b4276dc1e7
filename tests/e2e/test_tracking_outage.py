"""A tracking outage does not stop training: a real ``mlflow server`` on loopback is
killed mid-run and restarted on the same port and store; training goes on through the
outage, the metrics of every step reach the store, and steps were trained while it was
down.

The job has more steps than it will run: once the store shows steps trained well after
the server came back (and the node's system metrics again), the job is stopped as a
scheduler stops it (SIGTERM, a graceful stop with exit 143), so the test waits for what
it checks and not for a step count sized to the slowest machine. Stopping also flushes:
every step up to the one the job stopped after must be in the store.

Also checked on the way: the experiment is tagged as model training, the node's system
metrics arrive (and resume after the outage), and the run ends KILLED with its reason.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

RUN = [
    "train.steps=1000000",  # stopped by the test long before
    "train.log_every=1",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.warmup_steps=1",
    "train.micro_batch_size=2",
    "model.max_seq_len=32",
    "data.max_bytes=200000",
    "tracking.flush_timeout_s=120",
    "tracking.experiment=outage",
]
OUTAGE_S = 8.0
#: Training goes on this long after the server is back before the job is stopped.
AFTER_S = 5.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _start_server(tmp: Path, port: int) -> subprocess.Popen:
    cmd = [
        _bin("mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{tmp / 'store.db'}",
        "--artifacts-destination",
        str(tmp / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    log = (tmp / "server.log").open("a")
    proc = subprocess.Popen(cmd, cwd=tmp, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"mlflow server did not start:\n{(tmp / 'server.log').read_text()[-2000:]}")


def _kill_server(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # a crash, not a clean shutdown
    proc.wait(timeout=30)


def _worker_log_lines(since: float, must: str, needle: str) -> list[str]:
    """Lines holding ``needle`` and ``must`` in the Ray worker logs written after ``since``
    (the local Ray cluster's session folders under /tmp/ray), one per distinct line."""
    found: list[str] = []
    for path in Path("/tmp/ray").glob("session_*/logs/worker-*.err"):
        if path.stat().st_mtime < since:
            continue
        for piece in re.split(r"[\r\n]", path.read_text(errors="replace")):
            if needle in piece and must in piece and piece not in found:
                found.append(piece)
    return found


def _run_of(client, exp_name: str):  # noqa: ANN001
    """The run of ``exp_name``, None while there is none (or the server does not answer)."""
    try:
        exp = client.get_experiment_by_name(exp_name)
        runs = client.search_runs([exp.experiment_id]) if exp else []
    except Exception:
        return None
    return runs[0] if runs else None


def _wait_for(what: str, check, train: subprocess.Popen, err: Path, timeout: float):  # noqa: ANN001
    """``check()``'s first truthy value (polled every 0.5 s); fails, with the tail of the
    job's stderr file ``err``, when the job ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        if train.poll() is not None:
            tail = err.read_text()[-3000:]
            pytest.fail(f"the job ended (exit {train.returncode}) before {what}:\n{tail}")
        time.sleep(0.5)
    pytest.fail(f"no {what} within {timeout} s")


def _system_after(client, run_id: str, since_ms: int) -> list[str]:  # noqa: ANN001
    """The run's system metric keys once one of them was logged after ``since_ms``
    (MLflow's sampler dies in an outage; ours restarts it once the server is back)."""
    try:
        keys = [k for k in client.get_run(run_id).data.metrics if k.startswith("system/")]
    except Exception:
        return []
    return keys if keys and _after(client, run_id, keys[0], since_ms) else []


def _after(client, run_id: str, key: str, since_ms: int) -> bool:  # noqa: ANN001
    """True when ``key`` has a value logged after ``since_ms`` (the server answering)."""
    try:
        return any(m.timestamp > since_ms for m in client.get_metric_history(run_id, key))
    except Exception:
        return False


def test_training_survives_a_tracking_server_outage(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    port = _free_port()
    started = time.time()
    uri = f"http://127.0.0.1:{port}"
    server = _start_server(tmp_path, port)
    env = dict(os.environ, PYTHONWARNINGS="ignore", MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1")
    # No HTTP retries inside MLflow's client (turnout's default is 2, with backoff): else
    # a request in flight at the kill can retry across the whole outage and succeed, and
    # the outage is never seen (no warning). turnout's own outbox retries regardless.
    env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    env.pop("RAY_ADDRESS", None)
    err_log = tmp_path / "train.err"
    train = subprocess.Popen(
        [_bin("turnout"), "train", "tiny", *RUN, f"tracking.uri={uri}"],
        cwd=tmp_path,
        env=env,
        # Files, not pipes: nothing reads the job's output until it ends.
        stdout=(tmp_path / "train.out").open("w"),
        stderr=err_log.open("w"),
    )
    try:
        client = MlflowClient(tracking_uri=uri)
        # Training is under way: kill at once (waiting for the first system metrics too
        # can take long on a loaded machine).
        run = _wait_for(
            "a run with a loss",
            lambda: (r := _run_of(client, "outage")) and "loss" in r.data.metrics and r,
            train,
            err_log,
            240,
        )
        run_id = run.info.run_id
        _kill_server(server)
        down_ms = int(time.time() * 1000)
        time.sleep(OUTAGE_S)
        up_ms = int(time.time() * 1000)
        server = _start_server(tmp_path, port)
        back_ms = int(time.time() * 1000)  # serving again (its start-up takes seconds)
        _wait_for(
            f"a step logged {AFTER_S:.0f} s after the server was back",
            lambda: _after(client, run_id, "loss", back_ms + int(AFTER_S * 1000)),
            train,
            err_log,
            240,
        )
        system = _wait_for(
            "system metrics after the outage",
            lambda: _system_after(client, run_id, back_ms),
            train,
            err_log,
            120,
        )
        train.send_signal(signal.SIGTERM)  # the driver alone, as a scheduler does
        train.wait(timeout=300)
    finally:
        if train.poll() is None:
            train.kill()
        _kill_server(server)
    out, err = (tmp_path / "train.out").read_text(), err_log.read_text()
    assert train.returncode == 143, out + err
    assert "Traceback" not in out + err
    warnings = [ln for ln in err.splitlines() if "MLflow store is unreachable" in ln]
    if not warnings:
        # Seen once (2026-12-07): the rank-0 worker printed the warning into its Ray log
        # file and Ray's forwarding to the driver's stderr lost the line. That loss is an
        # open defect (a user can miss the warning); what this test checks is that the
        # outbox saw the outage and warned once, so it reads the worker logs then.
        warnings = _worker_log_lines(started, f":{port}", "MLflow store is unreachable")
    assert len(warnings) == 1, err
    assert ".jsonl" in warnings[0]
    m = re.search(r"stopped after step (\d+)", err)
    assert m, err
    stopped = int(m.group(1))

    # Every step's metrics reached the store, and some were logged while it was down.
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'store.db'}")
    final = client.get_run(run_id)
    loss = client.get_metric_history(run_id, "loss")
    exp = client.get_experiment(final.info.experiment_id)
    assert sorted(m.step for m in loss) == list(range(1, stopped + 1))
    assert any(down_ms <= m.timestamp <= up_ms for m in loss), "no step trained in the outage"
    assert final.info.status == "KILLED"
    assert final.data.tags["stop_reason"] == "SIGTERM to the launcher"
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    assert final.data.tags.get("node/node0")
    assert final.data.tags.get("checkpoint/latest_step") == str(stopped)
    assert system and all(k.startswith("system/node0/") for k in system)
