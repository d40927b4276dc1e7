"""Joining a cluster and submitting to one, the parts that need no cluster: addresses,
the reachability probe, failure lines, launch.placement, and what `turnout submit`
ships and runs. (The real two-node cluster is tests/e2e/test_multinode.py.)"""

from __future__ import annotations

import shlex
import socket
from pathlib import Path

import pytest

from turnout.config.load import load_config
from turnout.errors import ConfigError
from turnout.launch.ray.cluster import check_reachable, host_port, join_failure
from turnout.launch.ray.submit import (
    EXCLUDES,
    entrypoint,
    job_server_address,
    runtime_env,
    shipped_items,
)
from turnout.parallel.dist import free_port

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("10.0.0.1:6380", ("10.0.0.1", 6380)),
        ("head.example:6379", ("head.example", 6379)),
        ("ray://head:10001", ("head", 10001)),
        ("head", ("head", 6379)),
        ("[::1]:6379", ("::1", 6379)),
        ("auto", None),
    ],
)
def test_host_port(address: str, expected: tuple[str, int] | None) -> None:
    assert host_port(address) == expected


@pytest.mark.parametrize("address", ["http://head:8265", "head:port", ":6379"])
def test_bad_addresses_name_launch_address(address: str) -> None:
    with pytest.raises(ConfigError) as e:
        host_port(address)
    assert e.value.key == "launch.address"


def test_dashboard_address_points_to_submit() -> None:
    with pytest.raises(ConfigError, match="turnout submit"):
        host_port("http://head:8265")


def test_probe_passes_a_listener_and_refuses_a_closed_port() -> None:
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        check_reachable(f"127.0.0.1:{srv.getsockname()[1]}")
    port = free_port()
    with pytest.raises(ConfigError) as e:
        check_reachable(f"127.0.0.1:{port}")
    assert e.value.key == "launch.address"
    assert "connection refused" in e.value.message
    assert f"ray start --head --port {port}" in e.value.message


def test_probe_names_an_address_taken_from_ray_address(monkeypatch: pytest.MonkeyPatch) -> None:
    address = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("RAY_ADDRESS", address)
    with pytest.raises(ConfigError, match="from RAY_ADDRESS"):
        check_reachable(address)


def test_join_failure_tells_a_refused_token_from_the_rest() -> None:
    cause = RuntimeError("Failed to connect to GCS")
    outer = ConnectionError("Failed to connect to Ray cluster at 10.0.0.1:6379")
    outer.__cause__ = cause
    ray_said = "gcs_client.cc:210: Unauthenticated: RPC error: InvalidAuthToken: missing"
    auth = join_failure("10.0.0.1:6379", outer, ray_said)
    assert auth.key == "launch.address"
    assert "refused our authentication token" in auth.message
    assert "RAY_AUTH_TOKEN" in auth.message
    other = join_failure("10.0.0.1:6379", outer, "version mismatch")
    assert "refused" not in other.message
    assert "Failed to connect to Ray cluster at 10.0.0.1:6379" in other.message
    assert "\n" not in str(auth) + str(other)


def test_placement_is_validated() -> None:
    assert load_config("tiny").launch.placement == "PACK"
    assert load_config("tiny", ["launch.placement=STRICT_SPREAD"]).launch.placement == (
        "STRICT_SPREAD"
    )
    with pytest.raises(ConfigError) as e:
        load_config("tiny", ["launch.placement=spread_out"])
    assert e.value.key == "launch.placement"
    assert "'STRICT_SPREAD'" in e.value.message


def test_job_server_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert job_server_address("http://head:8265") == "http://head:8265"
    assert job_server_address("head:8265") == "http://head:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "https://ray.example")
    assert job_server_address(None) == "https://ray.example"
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS")
    with pytest.raises(ConfigError) as e:
        job_server_address(None)
    assert e.value.key == "--address"
    with pytest.raises(ConfigError):
        job_server_address("ray://head:10001")


def test_submit_ships_config_files_inside_the_folder_only(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    inner = tmp_path / "conf" / "run.yaml"
    inner.write_text("train: {steps: 3}\n")
    assert shipped_items(["tiny", "train.steps=3"], tmp_path) == ["tiny", "train.steps=3"]
    assert shipped_items(["train.steps=3"], tmp_path) == ["train.steps=3"]
    assert shipped_items([str(inner), "a.b=1"], tmp_path) == ["conf/run.yaml", "a.b=1"]
    outside = tmp_path.parent / "elsewhere.yaml"
    with pytest.raises(ConfigError) as e:
        shipped_items([str(outside)], tmp_path)
    assert e.value.key == "config" and "outside the folder shipped" in e.value.message


def test_submit_entrypoint_and_runtime_env(tmp_path: Path) -> None:
    cmd = entrypoint(["conf/my run.yaml", "tracking.run_name=a b"])
    assert shlex.split(cmd) == ["turnout", "train", "conf/my run.yaml", "tracking.run_name=a b"]
    env = runtime_env(tmp_path)
    assert env["working_dir"] == str(tmp_path)
    for heavy in (".venv/", "mlruns/", "mlflow.db", "checkpoints/", ".turnout/", ".ext/"):
        assert heavy in env["excludes"]
    assert env["excludes"] == EXCLUDES and env["excludes"] is not EXCLUDES


def test_interface_of_finds_loopback_and_nothing_for_a_foreign_address() -> None:
    from turnout.parallel.dist import interface_of

    assert interface_of("127.0.0.1") == "lo"
    assert interface_of("203.0.113.77") is None  # TEST-NET-3: on no interface here


def test_a_submission_waits_for_a_job_agent_then_goes_on(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Ray's job server says "no available agent" until its job agent is up: tried again
    (one note), then the job id; any other error is raised at once, as is that one once
    the wait is over."""
    from turnout.launch.ray.submit import NO_AGENT, submit_when_an_agent_is_ready

    answers: list[object] = [RuntimeError(f"500: {NO_AGENT}, please try again later."), "job-7"]
    answers.insert(0, answers[0])

    def submit_job() -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return str(answer)

    assert submit_when_an_agent_is_ready(submit_job, "http://h:8265", every_s=0.01) == "job-7"
    notes = capsys.readouterr().err.splitlines()
    assert notes == [
        "turnout: note: the job server at http://h:8265 has no job agent ready yet; "
        "trying again for up to 120 s"
    ]

    def refused() -> str:
        raise RuntimeError("401: token refused")

    with pytest.raises(RuntimeError, match="token refused"):
        submit_when_an_agent_is_ready(refused, "http://h:8265", every_s=0.01)

    def no_agent() -> str:
        raise RuntimeError(NO_AGENT)

    with pytest.raises(RuntimeError, match=NO_AGENT):
        submit_when_an_agent_is_ready(no_agent, "http://h:8265", wait_s=0.05, every_s=0.01)
