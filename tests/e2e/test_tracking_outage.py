"""A tracking outage does not stop training: a real ``mlflow server`` on loopback is
killed mid-run and restarted on the same port and store; the run finishes (exit 0), the
metrics of every step reach the store, and steps were trained while it was down.

Also checked on the way: the experiment is tagged as model training, the node's system
metrics arrive (and resume after the outage), and the run ends FINISHED.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STEPS = 600  # ~13 steps/s here: training goes on for a while after the server is back
RUN = [
    f"train.steps={STEPS}",
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


def _wait_for(client, exp_name: str, keys: tuple[str, ...], timeout: float):  # noqa: ANN001
    """The run of ``exp_name`` once it carries every metric in ``keys`` (prefixes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            exp = client.get_experiment_by_name(exp_name)
            runs = client.search_runs([exp.experiment_id]) if exp else []
        except Exception:
            runs = []
        if runs:
            names = list(runs[0].data.metrics)
            if all(any(n.startswith(k) for n in names) for k in keys):
                return runs[0]
        time.sleep(0.5)
    pytest.fail(f"no run with metrics {keys} within {timeout} s")


def test_training_survives_a_tracking_server_outage(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _start_server(tmp_path, port)
    env = dict(os.environ, PYTHONWARNINGS="ignore", MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1")
    env.pop("RAY_ADDRESS", None)
    train = subprocess.Popen(
        [_bin("turnout"), "train", "tiny", *RUN, f"tracking.uri={uri}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        client = MlflowClient(tracking_uri=uri)
        # Training is under way: kill at once (waiting for the first system metrics too
        # can take long enough on a loaded machine for the 600 steps to be over).
        run = _wait_for(client, "outage", ("loss",), timeout=240)
        assert train.poll() is None, "training ended before the outage"
        _kill_server(server)
        down_ms = int(time.time() * 1000)
        time.sleep(OUTAGE_S)
        up_ms = int(time.time() * 1000)
        server = _start_server(tmp_path, port)
        back_ms = int(time.time() * 1000)  # serving again (its start-up takes seconds)
        out, err = train.communicate(timeout=400)
    finally:
        if train.poll() is None:
            train.kill()
        _kill_server(server)
    assert train.returncode == 0, out + err
    assert "turnout: training finished" in out
    warnings = [ln for ln in err.splitlines() if "MLflow store is unreachable" in ln]
    assert len(warnings) == 1, err
    assert ".jsonl" in warnings[0]

    # Every step's metrics reached the store, and some were logged while it was down.
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'store.db'}")
    final = client.get_run(run.info.run_id)
    loss = client.get_metric_history(run.info.run_id, "loss")
    exp = client.get_experiment(final.info.experiment_id)
    assert sorted(m.step for m in loss) == list(range(1, STEPS + 1))
    assert any(down_ms <= m.timestamp <= up_ms for m in loss), "no step trained in the outage"
    assert final.info.status == "FINISHED"
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    assert final.data.tags.get("node/node0")
    assert final.data.tags.get("checkpoint/latest_step") == str(STEPS)
    system = [k for k in final.data.metrics if k.startswith("system/node0/")]
    assert system
    # MLflow's sampler died in the outage; ours restarted it once the server was back.
    samples = client.get_metric_history(run.info.run_id, system[0])
    assert max(m.timestamp for m in loss) > back_ms + 5000, "training ended too soon to tell"
    assert any(m.timestamp > back_ms for m in samples), "no system metrics after the outage"
