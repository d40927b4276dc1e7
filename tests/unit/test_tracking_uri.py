"""The one reader of tracking.uri: which stores are accepted, and where local ones live."""

from __future__ import annotations

from pathlib import Path

import pytest

from turnout.errors import ConfigError
from turnout.trainer.tracking.uri import (
    absolute_tracking_uri,
    check_tracking_uri,
    local_sqlite_uri,
    sqlite_artifact_root,
    sqlite_db_path,
    uri_scheme,
)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("sqlite:///mlflow.db", "sqlite:////home/u/run/mlflow.db"),
        ("sqlite:///sub/m.db", "sqlite:////home/u/run/sub/m.db"),
        ("sqlite:////abs/m.db", "sqlite:////abs/m.db"),
        ("mlruns", "/home/u/run/mlruns"),
        ("./mlruns", "/home/u/run/mlruns"),
        ("file://mlruns", "file:///home/u/run/mlruns"),
        ("file:///abs/mlruns", "file:///abs/mlruns"),
        ("http://mlflow.internal:5000", "http://mlflow.internal:5000"),
        ("databricks", "databricks"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("mysql+pymysql://u@h/db", "mysql+pymysql://u@h/db"),
    ],
)
def test_absolute_tracking_uri(uri: str, expected: str) -> None:
    assert absolute_tracking_uri(uri, Path("/home/u/run")) == expected


def test_sqlite_db_path() -> None:
    assert sqlite_db_path("sqlite:////a/b.db") == Path("/a/b.db")
    assert sqlite_db_path("sqlite:///b.db") == Path("b.db")
    assert sqlite_db_path("sqlite:///:memory:") is None
    assert sqlite_db_path("http://x") is None


def test_local_sqlite_uri_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert local_sqlite_uri("sqlite:///m.db") == f"sqlite:///{tmp_path.resolve() / 'm.db'}"
    assert local_sqlite_uri("https://h") == "https://h"


def test_sqlite_artifacts_live_beside_the_database(tmp_path: Path) -> None:
    root = sqlite_artifact_root(f"sqlite:///{tmp_path / 'x' / 'mlflow.db'}")
    assert root == (tmp_path / "x" / "mlartifacts").as_uri()
    assert sqlite_artifact_root("http://mlflow.example:5000") is None


@pytest.mark.parametrize(
    ("uri", "scheme"),
    [
        ("sqlite:///mlflow.db", "sqlite"),
        ("mlruns", ""),
        ("/abs/mlruns", ""),
        ("file:///abs/mlruns", "file"),
        ("https://mlflow.example", "https"),
        ("databricks", "databricks"),
        ("databricks://profile", "databricks"),
        ("postgresql+psycopg2://u@h/db", "postgresql"),
        ("mssql://u@h/db", "mssql"),
    ],
)
def test_supported_stores_pass(uri: str, scheme: str) -> None:
    assert uri_scheme(uri) == scheme
    check_tracking_uri(uri)


@pytest.mark.parametrize(
    "uri", ["ftp://host/x", "s3://bucket/mlruns", "mongodb://h/db", "a+b+c://x", "", "  "]
)
def test_unsupported_stores_name_the_key(uri: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_tracking_uri(uri)
    assert err.value.key == "tracking.uri"
