"""Joining or submitting to a Ray cluster needs token authentication configured here;
launch.allow_unauthenticated=true turns the refusal into a warning naming the risk. An
embedded cluster gets a fresh token of its own, in the environment, never a file's."""

from __future__ import annotations

from pathlib import Path

import pytest

from turnout.config.load import load_config
from turnout.errors import ConfigError, error_line
from turnout.launch.ray import auth
from turnout.launch.ray.auth import require_token_auth, token_auth_configured

pytestmark = pytest.mark.unit


@pytest.fixture
def no_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An environment with no Ray token anywhere (an empty home)."""
    for name in (auth.MODE_ENV, auth.TOKEN_ENV, auth.TOKEN_PATH_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(auth, "_warned", set())
    return tmp_path


def test_the_key_defaults_to_refusing() -> None:
    assert load_config("tiny").launch.allow_unauthenticated is False
    cfg = load_config("tiny", ["launch.allow_unauthenticated=true"])
    assert cfg.launch.allow_unauthenticated is True


def test_no_token_is_refused_in_one_line(no_token: Path) -> None:
    assert not token_auth_configured()
    with pytest.raises(ConfigError) as e:
        require_token_auth("10.0.0.1:6379", False, "launch.address")
    line = error_line(str(e.value))
    assert line.startswith("turnout: error: launch.address: refusing to reach the Ray cluster")
    for how in ("RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN", "launch.allow_unauthenticated=true"):
        assert how in line, line
    assert "\n" not in line


def test_allowing_it_warns_once_naming_the_risk(
    no_token: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    require_token_auth("http://head:8265", True, "--address")
    require_token_auth("http://head:8265", True, "--address")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("turnout: warning: reaching the Ray cluster at http://head:8265")
    assert "run code on it as you" in err[0]


@pytest.mark.parametrize("where", ["env", "path", "home"])
def test_a_token_anywhere_ray_reads_one_is_enough(
    no_token: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    if where == "env":
        monkeypatch.setenv(auth.TOKEN_ENV, "a" * 64)
    elif where == "path":
        (no_token / "tok").write_text("b" * 64)
        monkeypatch.setenv(auth.TOKEN_PATH_ENV, str(no_token / "tok"))
    else:
        (no_token / ".ray").mkdir()
        (no_token / ".ray" / "auth_token").write_text("c" * 64)
    require_token_auth("10.0.0.1:6379", False, "launch.address")
    import os

    assert os.environ[auth.MODE_ENV] == "token"  # Ray would turn it on too; now explicit


def test_auth_mode_disabled_counts_as_none(no_token: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(auth.TOKEN_ENV, "a" * 64)
    monkeypatch.setenv(auth.MODE_ENV, "disabled")
    with pytest.raises(ConfigError):
        require_token_auth("10.0.0.1:6379", False, "launch.address")


def test_cli_refuses_before_anything_runs(no_token: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from turnout.launch.cli import main

    monkeypatch.chdir(no_token)
    assert main(["train", "tiny", "--address", "127.0.0.1:1"]) == 2
    assert main(["submit", "tiny", "--address", "http://127.0.0.1:1"]) == 2
    assert list(no_token.iterdir()) == []  # no store, no checkpoint, nothing submitted


def test_an_embedded_cluster_gets_a_fresh_token(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in (auth.MODE_ENV, auth.TOKEN_ENV, auth.LOCAL_ONLY_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(auth.TOKEN_PATH_ENV, "/somewhere/else")
    from ray._private import ray_constants

    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    auth.isolate_local_cluster()
    first = os.environ[auth.TOKEN_ENV]
    auth.isolate_local_cluster()
    assert os.environ[auth.TOKEN_ENV] != first and len(first) == 64
    assert os.environ[auth.MODE_ENV] == "token"
    assert auth.TOKEN_PATH_ENV not in os.environ
    assert os.environ[auth.LOCAL_ONLY_ENV] == "0" and ray_constants.ENABLE_RAY_CLUSTER is False
    from ray._private.services import get_node_ip_address

    assert get_node_ip_address() == "127.0.0.1"
    auth.leave_local_cluster()  # the process's own environment back, cluster flag too
    assert os.environ[auth.TOKEN_PATH_ENV] == "/somewhere/else"
    assert not {auth.MODE_ENV, auth.TOKEN_ENV, auth.LOCAL_ONLY_ENV} & set(os.environ)
    assert ray_constants.ENABLE_RAY_CLUSTER is True
