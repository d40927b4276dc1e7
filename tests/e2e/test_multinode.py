"""End to end on a real two-node Ray cluster (head + worker node, two raylets, started
with ``ray start``; see tests/ray_nodes.py for the layout: two network namespaces joined
by a veth where we may create them, else two loopback node addresses on this host).

- ``turnout train tiny --address HEAD:PORT launch.placement=STRICT_SPREAD``: one
  worker on each node, gloo on each node's own address (across the veth), training
  finishes;
- ``turnout submit``: the same job through Ray's job API, the working dir shipped,
  logs followed, the exit code returned (0 for a job that succeeds, the job's own 2
  for one whose config fails on the cluster);
- a cluster that refuses our token (a wrong one, or none with
  ``launch.allow_unauthenticated=true``) is one line naming ``launch.address``, exit 2;
  so is no token at all (turnout refuses before reaching out), and, at once, an
  address where nothing listens.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_cli_train import SHORT
from tests.ray_nodes import Cluster, base_env, start_cluster, stop_cluster
from turnout.config.load import preset_dir
from turnout.parallel.dist import free_port

pytestmark = pytest.mark.e2e

RANK_LINE = re.compile(r"^turnout: rank (\d+) on node (\d+) \(([^,]+), gloo on ([^)]+)\)", re.M)
# Gloo's traffic for 4 steps of `tiny` (a ZeRO-2 reduce-scatter and all-gather of ~0.5 M
# fp32 dense parameters a step, the expert all-to-all, the metric reductions) is several
# times this.
MIN_VETH_BYTES = 2_000_000


def _turnout() -> list[str]:
    exe = Path(sys.executable).with_name("turnout")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("turnout")
    return [found] if found else [sys.executable, "-m", "turnout.launch.cli"]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = start_cluster()
    try:
        yield c
    finally:
        stop_cluster(c)


def _on_head(
    c: Cluster,
    args: list[str],
    cwd: Path,
    timeout: int = 240,
    drop: tuple[str, ...] = (),
    **env: str,
) -> subprocess.CompletedProcess:
    full_env = c.env(**env)
    for var in drop:
        full_env.pop(var, None)
    return subprocess.run(
        c.on_head([*_turnout(), *args]),
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _ranks(out: str) -> dict[int, tuple[str, str]]:
    """rank -> (node address, gloo interface), from the workers' rendezvous lines."""
    return {int(m.group(1)): (m.group(3), m.group(4)) for m in RANK_LINE.finditer(out)}


def _check_two_nodes(c: Cluster, out: str) -> None:
    ranks = _ranks(out)
    assert sorted(ranks) == [0, 1], out
    ips = {ip for ip, _ in ranks.values()}
    if c.netns:  # each rank's gloo is bound to its own end of the veth
        assert ips == {c.head_ip, c.worker_ip}, ranks
        assert {dev for _, dev in ranks.values()} == set(c.veth), ranks
    else:  # Ray may register a loopback head under the host's own address
        assert len(ips) == 2 and c.worker_ip in ips, ranks


@pytest.mark.slow
def test_train_one_worker_per_node(cluster: Cluster, tmp_path: Path) -> None:
    before = cluster.veth_bytes(1) if cluster.netns else 0
    args = ["train", "tiny", *SHORT, "launch.placement=STRICT_SPREAD", "--address", cluster.gcs]
    proc = _on_head(cluster, args, tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "turnout: training finished" in proc.stdout, out
    assert "Traceback" not in out
    assert f"2 worker(s) on {cluster.gcs}" in proc.stdout
    _check_two_nodes(cluster, out)
    if cluster.netns:
        crossed = cluster.veth_bytes(1) - before
        assert crossed > MIN_VETH_BYTES, f"only {crossed} bytes crossed the veth"


def _stderr_lines(proc: subprocess.CompletedProcess) -> tuple[list[str], list[str]]:
    """(error lines, warning lines) of a command's stderr; nothing else may be there."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    warnings = [ln for ln in lines if ln.startswith("turnout: warning: ")]
    errors = [ln for ln in lines if ln not in warnings]
    return errors, warnings


@pytest.mark.slow
@pytest.mark.parametrize("token", ["wrong", "missing", "missing-allowed"])
def test_refused_token_is_one_line(cluster: Cluster, tmp_path: Path, token: str) -> None:
    """A wrong token: the cluster refuses it, one line. No token: turnout refuses to go,
    one line, unless launch.allow_unauthenticated=true: then it warns once and the
    cluster refuses, one line."""
    drop: tuple[str, ...] = ()
    allow: list[str] = []
    if token == "wrong":
        env = {"RAY_AUTH_TOKEN": "0" * 64}
    else:  # no token anywhere (an empty home), auth mode left to Ray
        env, drop = {"HOME": str(tmp_path)}, ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")
        allow = ["launch.allow_unauthenticated=true"] if token == "missing-allowed" else []
    # Ray retries a refused connection once a second; 2 tries keep the test short.
    env["RAY_gcs_server_port_wait_time_s"] = "2"
    refused_here = token == "missing"
    args = ["train", "tiny", *SHORT, *allow, "--address", cluster.gcs]
    proc = _on_head(cluster, args, tmp_path, timeout=120, drop=drop, **env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors, warnings = _stderr_lines(proc)
    assert len(errors) == 1, proc.stderr
    assert len(warnings) == (1 if allow else 0), proc.stderr
    line = errors[0]
    assert line.startswith("turnout: error: launch.address: "), line
    if refused_here:
        assert "without token authentication" in line and "RAY_AUTH_MODE=token" in line, line
        assert "launch.allow_unauthenticated=true" in line, line
    else:
        assert "refused our authentication token" in line and "RAY_AUTH_TOKEN" in line, line
    if allow:
        assert "without token authentication" in warnings[0], warnings

    # The job server refuses the same token: one line too, nothing submitted.
    args = ["submit", "tiny", *SHORT, *allow, "--address", cluster.dashboard]
    proc = _on_head(cluster, args, tmp_path, timeout=120, drop=drop, **env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors, warnings = _stderr_lines(proc)
    assert len(errors) == 1, proc.stderr
    assert len(warnings) == (1 if allow else 0), proc.stderr
    line = errors[0]
    assert line.startswith("turnout: error: --address: "), line
    if refused_here:
        assert "without token authentication" in line, line
    else:
        assert line.startswith("turnout: error: --address: the job server at "), line
        assert "refused our authentication token" in line, line
    assert "submitted" not in proc.stdout


@pytest.mark.slow
def test_submit_ships_folder_follows_logs_returns_exit_code(
    cluster: Cluster, tmp_path: Path
) -> None:
    job = tmp_path / "job"
    job.mkdir()
    shutil.copy(preset_dir() / "tiny.yaml", job / "job.yaml")  # only the shipped copy has it
    (job / "checkpoints").mkdir()
    (job / "checkpoints" / "old.bin").write_bytes(b"\0" * 1024)  # excluded from shipping

    args = ["submit", "job.yaml", *SHORT, "launch.placement=STRICT_SPREAD"]
    proc = _on_head(cluster, [*args, "--address", cluster.dashboard], job)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert re.search(r"^turnout: submitted job \S+ to http", proc.stdout, re.M), out
    # The job's own output, followed here: both ranks, each on its node, and the end.
    _check_two_nodes(cluster, out)
    assert "turnout: training finished" in proc.stdout, out
    assert re.search(r"^turnout: job \S+ SUCCEEDED", proc.stdout, re.M), out
    # It ran in the copy of this folder on the head node, not here.
    m = re.search(r"^\s+checkpoint\s+(\S+)", proc.stdout, re.M)
    assert m and m.group(1).startswith(cluster.temp_dirs[0]), out
    assert sorted(p.name for p in (job / "checkpoints").iterdir()) == ["old.bin"]

    # A config that only the cluster can find wrong: the job's exit code comes back.
    bad = ["submit", "tiny", *SHORT, "train.resume=/nonexistent/step4"]
    proc = _on_head(cluster, [*bad, "--address", cluster.dashboard], job, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "turnout: error: train.resume: " in proc.stdout, out
    assert re.search(r"^turnout: job \S+ FAILED \(exit code 2\)", proc.stdout, re.M), out


def test_unreachable_address_is_one_line_at_once(tmp_path: Path) -> None:
    env = base_env()
    env.pop("RAY_AUTH_MODE")  # left to Ray: a token is enough
    env["RAY_AUTH_TOKEN"] = "0" * 64  # token authentication configured: the probe runs
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    proc = subprocess.run(
        [*_turnout(), "train", "tiny", *SHORT, "--address", address],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    took = time.monotonic() - start
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1, proc.stderr
    expected = f"turnout: error: launch.address: no Ray cluster answers at '{address}'"
    assert errors[0].startswith(expected), errors[0]
    assert "ray start --head" in errors[0]
    assert took < 30, f"{took:.1f} s"
    assert not (tmp_path / "mlflow.db").exists()  # found before an MLflow run was opened


def test_submit_without_job_server_is_one_line(tmp_path: Path) -> None:
    env = base_env()
    env.pop("RAY_AUTH_MODE")
    env["RAY_AUTH_TOKEN"] = "0" * 64
    address = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.run(
        [*_turnout(), "submit", "tiny", *SHORT, "--address", address],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1, proc.stderr
    expected = f"turnout: error: --address: no Ray job server answers at {address}"
    assert errors[0].startswith(expected), errors[0]
    assert os.listdir(tmp_path) == []  # nothing written, nothing submitted
