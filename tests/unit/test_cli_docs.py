"""The README's key table and `turnout keys` come from the config dataclasses."""

from __future__ import annotations

from pathlib import Path

import pytest

from turnout.config.load import flatten, load_config, to_yaml
from turnout.config.model import MoEConfig
from turnout.launch.keys import config_keys, field_docs

pytestmark = pytest.mark.unit

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_key_is_listed_and_documented() -> None:
    rows = config_keys()
    keys = [k for k, _, _ in rows]
    assert sorted(keys) == sorted(flatten(load_config(None, [])))
    undocumented = [k for k, _, doc in rows if not doc]
    assert not undocumented, f"fields without a docstring: {undocumented}"


def test_field_docs_reads_the_string_below_each_field() -> None:
    docs = field_docs(MoEConfig)
    assert docs["top_k"] == "Experts chosen per token (token-choice top-k)."
    assert "dropless" in docs["capacity_factor"]


def test_readme_lists_every_key() -> None:
    text = README.read_text()
    missing = [k for k, _, _ in config_keys() if f"`{k}`" not in text]
    assert not missing, f"README lacks {missing}; regenerate with `turnout keys --markdown`"


def test_resolved_yaml_is_a_loadable_config(tmp_path: Path) -> None:
    cfg = load_config("tiny", ["model.moe.num_experts=8", "train.steps=9"])
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(str(path)) == cfg
