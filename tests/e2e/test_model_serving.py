"""End to end: a checkpoint exported to MLflow, registered, and served by ``mlflow models
serve`` as a real subprocess; a prompt posted to ``/invocations`` comes back continued
exactly as ``turnout generate --temperature 0`` continues it.

``--env-manager local`` (serve in this environment, where turnout is installed) is the
supported way to serve a turnout model; the checkpoint is a seeded random tiny model.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.tiny import tiny_checkpoint
from turnout.launch.cli import main

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROMPT = "import os\n"
NEW_TOKENS = 16
#: How long the server may take to answer /ping on a busy 2-core machine.
START_TIMEOUT_S = 900


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_ping(proc: subprocess.Popen, port: int, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"mlflow models serve exited:\n{log.read_text()}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    pytest.fail(f"no /ping answer in {START_TIMEOUT_S} s:\n{log.read_text()}")


def _post(port: int, body: dict) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=START_TIMEOUT_S) as r:
        return json.loads(r.read())


def test_mlflow_models_serve_continues_a_prompt_like_generate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tiny_checkpoint(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["export", str(folder), str(tmp_path / "export"), "--mlflow", "--tracking-uri", uri]
    assert main([*argv, "--register-as", "served-lm"]) == 0
    argv = ["generate", str(folder), "--prompt", PROMPT, "--temperature", "0"]
    capsys.readouterr()
    assert main([*argv, "--max-new-tokens", str(NEW_TOKENS)]) == 0
    expected = capsys.readouterr().out.removesuffix("\n")

    port = _free_port()
    mlflow_exe = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_exe), "models", "serve", "-m", "models:/served-lm/1"]
    cmd += ["--env-manager", "local", "-p", str(port), "--host", "127.0.0.1"]
    # The serving command runs `uvicorn` by name: this environment's bin/ goes first.
    path = os.pathsep.join([str(mlflow_exe.parent), os.environ.get("PATH", "")])
    # MLflow's scoring server answers 504 after 60 s by default; a starved CPU can take
    # longer than that for the first request (liveness bound, not a timing check).
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, PATH=path)
    env["MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"] = str(START_TIMEOUT_S)
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_for_ping(proc, port, log)
        body = {"inputs": [PROMPT], "params": {"max_new_tokens": NEW_TOKENS, "temperature": 0}}
        answer = _post(port, body)
        # The request and its answer, for the record (pytest -s shows them).
        print(f"POST /invocations {json.dumps(body)}\n-> {json.dumps(answer)}")
        assert answer == {"predictions": [{"text": expected}]}, answer
        records = {"dataframe_records": [{"prompt": PROMPT}], "params": body["params"]}
        assert _post(port, records) == answer
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """End the server this test started and the workers it started (its own session)."""
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):  # already gone
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue
