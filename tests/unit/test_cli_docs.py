"""docs/config.md and `turnout keys` come from the config dataclasses."""

from __future__ import annotations

from pathlib import Path

import pytest

from turnout.config.load import flatten, load_config, to_yaml
from turnout.config.model import MoEConfig
from turnout.launch.keys import COMMAND, config_keys, field_docs, markdown_page

pytestmark = pytest.mark.unit

CONFIG_DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"


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


def test_config_doc_lists_every_key() -> None:
    text = CONFIG_DOC.read_text()
    missing = [k for k, _, _ in config_keys() if f"`{k}`" not in text]
    assert not missing, f"docs/config.md lacks {missing}; regenerate with `{COMMAND}`"


def test_config_doc_is_fresh() -> None:
    assert CONFIG_DOC.read_text() == markdown_page(), (
        f"docs/config.md is stale (the config dataclasses or launch/keys.py changed); "
        f"regenerate it with `{COMMAND}`"
    )


def test_resolved_yaml_is_a_loadable_config(tmp_path: Path) -> None:
    cfg = load_config("tiny", ["model.moe.num_experts=8", "train.steps=9"])
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(str(path)) == cfg


@pytest.mark.parametrize(
    ("command", "page"),
    [(["keys", "--markdown"], "config.md"), (["metrics", "--markdown"], "metrics.md")],
)
def test_the_regenerate_commands_print_the_pages(
    command: list[str], page: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from turnout.launch.cli import main

    assert main(command) == 0
    assert capsys.readouterr().out == (CONFIG_DOC.parent / page).read_text()
