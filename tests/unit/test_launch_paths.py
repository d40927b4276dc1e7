"""The launcher makes every path in a config absolute before shipping it to workers."""

from __future__ import annotations

from pathlib import Path

import pytest

from turnout.config.load import load_config
from turnout.launch.paths import absolute_tracking_uri, resolve_paths, sqlite_db_path

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
    ],
)
def test_absolute_tracking_uri(uri: str, expected: str) -> None:
    assert absolute_tracking_uri(uri, Path("/home/u/run")) == expected


def test_sqlite_db_path() -> None:
    assert sqlite_db_path("sqlite:////a/b.db") == Path("/a/b.db")
    assert sqlite_db_path("http://x") is None


def test_resolve_paths_leaves_the_input_alone(tmp_path: Path) -> None:
    cfg = load_config("tiny", ["train.ckpt_dir=ck", "data.corpus=texts"])
    out = resolve_paths(cfg, tmp_path)
    assert cfg.train.ckpt_dir == "ck"
    assert out.train.ckpt_dir == str(tmp_path.resolve() / "ck")
    assert out.data.corpus == str(tmp_path.resolve() / "texts")
    assert out.data.cache_dir == str(tmp_path.resolve() / ".turnout_cache")
    assert out.tracking.uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert out.launch.storage_path == str(tmp_path.resolve() / ".turnout" / "ray")
    assert out.train.resume == ""
    assert resolve_paths(load_config("tiny"), tmp_path).data.corpus == "stdlib"
