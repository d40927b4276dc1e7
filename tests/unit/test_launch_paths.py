"""The launcher makes every path in a config absolute before shipping it to workers."""

from __future__ import annotations

from pathlib import Path

import pytest

from turnout.config.load import load_config
from turnout.launch.paths import resolve_paths

pytestmark = pytest.mark.unit


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
