"""Secrets never reach a record, and a tracking server that wants credentials gets them.

A real MLflow server with its basic-auth app (``mlflow server --app-name basic-auth``)
on loopback, its admin password one of the planted secrets. Known secret values are
planted where a user keeps them: ``MLFLOW_TRACKING_PASSWORD`` and
``MLFLOW_TRACKING_TOKEN``, ``HF_TOKEN`` and ``HUGGING_FACE_HUB_TOKEN``, a
``RAY_AUTH_TOKEN`` of the user's own (the embedded cluster must use a fresh one), and
``user:password@`` inside ``tracking.uri``. A short job of the tiny preset logs to the
server with the credentials in the environment and in the URI; one with a wrong
password is refused in one line. While the first runs, the embedded cluster's own
token is read from its raylet's environment, and becomes a secret too; and the job's
processes are watched as tests/e2e/test_listeners.py watches a torchrun job: none may
listen beyond loopback, and none may show a secret on its command line.

Then everything the runs wrote is searched for every secret: the run folder (the
working directory: checkpoints, Ray Train's state and turnout's worker logs), the
server's store (its database, holding params and tags, and its artifacts: the logged
config.yaml), the Ray session's logs (where the workers' output goes), the commands'
captured stdout and stderr, and the command lines of the job's processes.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.e2e.test_cli_train import SHORT
from tests.e2e.test_listeners import JobWatch, Listener, table
from turnout.parallel.dist import free_port, is_loopback

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ADMIN = "admin"
ADMIN_PASSWORD = f"planted-mlflow-pw-{secrets.token_hex(8)}"
PLANTED = {
    "MLFLOW_TRACKING_TOKEN": f"planted-mlflow-token-{secrets.token_hex(8)}",
    "HF_TOKEN": f"hf_planted{secrets.token_hex(12)}",
    "HUGGING_FACE_HUB_TOKEN": f"hf_planted{secrets.token_hex(12)}",
    "RAY_AUTH_TOKEN": f"planted-ray-{secrets.token_hex(16)}",
}
WRONG_PASSWORD = f"planted-wrong-pw-{secrets.token_hex(8)}"
_SESSION = re.compile(r"session_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+_\d+")
_START_S = 300.0  # the server's start on a busy 2-core machine (a wait, not a check)


@dataclass
class Server:
    uri: str
    port: int
    store: Path


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("mlflow-auth")
    store = home / "store"
    store.mkdir()
    ini = home / "auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{home / 'users.db'}\n"
        f"admin_username = {ADMIN}\nadmin_password = {ADMIN_PASSWORD}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # One password hash per hour, not per request: each takes seconds on a busy CPU.
        "auth_cache_ttl_seconds = 3600\n"
    )
    port = free_port()
    env = dict(
        os.environ,
        MLFLOW_AUTH_CONFIG_PATH=str(ini),
        MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16),
    )
    cmd = [
        _bin("mlflow"),
        "server",
        "--app-name",
        "basic-auth",
        "--backend-store-uri",
        f"sqlite:///{store / 'mlflow.db'}",
        "--artifacts-destination",
        str(store / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    log = (home / "server.log").open("a")
    proc = subprocess.Popen(cmd, cwd=home, env=env, stdout=log, stderr=log, start_new_session=True)
    try:
        _wait_ready(port, proc, home / "server.log")
        yield Server(f"http://127.0.0.1:{port}", port, store)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        log.close()


def _wait_ready(port: int, proc: subprocess.Popen, log: Path) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + _START_S
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return
        except (urllib.error.URLError, OSError):
            time.sleep(1)
    pytest.fail(f"the MLflow auth server did not start:\n{log.read_text()[-2000:]}")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env["PYTHONWARNINGS"] = "ignore"
    # The auth server answers slowly on a busy machine: more than turnout's 10 s default.
    env["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "120"
    env.update(extra)
    return env


def _ray_token_and_session(root: psutil.Process) -> tuple[str, str]:
    """The RAY_AUTH_TOKEN a raylet under ``root`` runs with, and its session name."""
    for proc in root.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if proc.name() == "raylet":
                sessions = _SESSION.findall(" ".join(proc.cmdline()))
                return proc.environ().get("RAY_AUTH_TOKEN", ""), sessions[0] if sessions else ""
    return "", ""


@dataclass
class Watched:
    """What was seen of a job while it ran (tests/e2e/test_listeners.py's helpers)."""

    proc: subprocess.CompletedProcess
    ray_token: str  # the RAY_AUTH_TOKEN its raylet ran with
    session: str  # its Ray session
    found: set[Listener]  # every listening socket of its processes
    lines: list[str]  # the command lines of its processes but the one started


def _train(cwd: Path, uri: str, env: dict[str, str]) -> Watched:
    """Run the short job; watch its processes (their listeners, command lines, and the
    embedded cluster's token and session) until it ends."""
    cmd = [_bin("turnout"), "train", "tiny", *SHORT, f"tracking.uri={uri}"]
    # Files, not pipes: nothing reads the job's output until it ends.
    out_f, err_f = (cwd / "train.out").open("w+b"), (cwd / "train.err").open("w+b")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out_f, stderr=err_f)
    watch = JobWatch(psutil.Process(proc.pid))
    token, session = "", ""
    deadline = time.monotonic() + 2400  # a busy 2-core machine
    while proc.poll() is None and time.monotonic() < deadline:
        if not token:
            token, session = _ray_token_and_session(watch.root)
        watch.poll()
        time.sleep(0.2)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    out_f.seek(0)
    err_f.seek(0)
    done = subprocess.CompletedProcess(
        cmd, proc.returncode, out_f.read().decode(), err_f.read().decode()
    )
    return Watched(done, token, session, watch.found, watch.lines())


def _files(*folders: Path) -> Iterator[Path]:
    for folder in folders:
        yield from (p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _leaks(secrets_: dict[str, str], texts: dict[str, bytes]) -> list[str]:
    return [
        f"{name} in {where}"
        for where, data in texts.items()
        for name, value in secrets_.items()
        if value.encode() in data
    ]


def test_planted_secrets_reach_no_record(auth_server: Server, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    host = f"127.0.0.1:{auth_server.port}"
    outputs: dict[str, bytes] = {}
    sessions: list[str] = []
    ray_tokens: list[str] = []

    # A run whose credentials are in the environment (where MLflow reads them) and, the
    # same ones, inside tracking.uri; beside them the planted secrets.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = _env(MLFLOW_TRACKING_USERNAME=ADMIN, MLFLOW_TRACKING_PASSWORD=ADMIN_PASSWORD, **PLANTED)
    job = _train(run_dir, f"http://{ADMIN}:{ADMIN_PASSWORD}@{host}", env)
    proc = job.proc
    assert proc.returncode == 0, proc.stdout + proc.stderr
    outputs["stdout of the run"] = proc.stdout.encode()
    outputs["stderr of the run"] = proc.stderr.encode()
    # The password is in the URI on the launcher's command line (where the user put it);
    # no process the launcher starts may show it, or any other secret, on its own.
    outputs["command lines of the run's processes"] = "\n".join(job.lines).encode()
    sessions.append(job.session)
    ray_tokens.append(job.ray_token)
    assert f"tracking http://{host}" in proc.stdout  # the store is named, without them

    # Nothing of the job listened beyond loopback (the job was seen while Ray ran: its
    # GCS and raylet listened).
    print(f"\nlisteners of the Ray job (session {job.session}):\n{table(job.found)}")
    assert {"gcs_server", "raylet"} <= {n for n, *_ in job.found}, table(job.found)
    exposed = {entry for entry in job.found if not is_loopback(entry[2])}
    assert not exposed, f"listening beyond loopback:\n{table(exposed)}"

    # A wrong password: refused by the server, one line, the password not in it.
    run_bad = tmp_path / "wrong-creds"
    run_bad.mkdir()
    bad = subprocess.run(
        [
            _bin("turnout"),
            "train",
            "tiny",
            *SHORT,
            f"tracking.uri=http://{ADMIN}:{WRONG_PASSWORD}@{host}",
        ],
        cwd=run_bad,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bad.returncode == 1, bad.stdout + bad.stderr  # a RunError: the store refused
    errors = [ln for ln in bad.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and errors[0].startswith("turnout: error: tracking.uri: "), errors
    outputs["stdout of the wrong-password run"] = bad.stdout.encode()
    outputs["stderr of the wrong-password run"] = bad.stderr.encode()

    # Each embedded cluster ran with a fresh token of its own, not the user's.
    assert re.fullmatch(r"[0-9a-f]{64}", ray_tokens[0]), "no token read"
    assert PLANTED["RAY_AUTH_TOKEN"] not in ray_tokens

    # The server holds the run, with the store named in its params, no credentials.
    client = MlflowClient(tracking_uri=f"http://{ADMIN}:{ADMIN_PASSWORD}@{host}")
    runs = client.search_runs([client.get_experiment_by_name("turnout").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert {r.data.params["tracking.uri"] for r in runs} == {f"http://{host}"}
    for r in runs:
        params = " ".join(f"{k}={v}" for k, v in r.data.params.items())
        tags = " ".join(f"{k}={v}" for k, v in r.data.tags.items())
        outputs[f"params and tags of run {r.info.run_id}"] = (params + tags).encode()

    session_logs = [Path("/tmp/ray") / s / "logs" for s in sessions if s]
    assert len(session_logs) == 1 and session_logs[0].is_dir(), sessions
    files = list(_files(run_dir, run_bad, auth_server.store, *session_logs))
    assert any(p.name == "config.yaml" for p in files)  # the logged config is among them
    texts = {str(p): p.read_bytes() for p in files}
    texts.update(outputs)
    planted = {
        **PLANTED,
        "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD,
        "the wrong password": WRONG_PASSWORD,
        "the run's own Ray token": ray_tokens[0],
    }
    leaks = _leaks(planted, texts)
    assert not leaks, "\n".join(leaks)
    print(f"\nsearched {len(texts)} files and outputs for {len(planted)} secrets: none found")
