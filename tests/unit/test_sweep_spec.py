"""Sweep specs: their keys checked, expanded into trials whose steps make the budget."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from turnout.config.load import load_config
from turnout.config.sweep import load_spec
from turnout.errors import ConfigError
from turnout.launch.cli import main
from turnout.launch.sweep.trials import expand, tokens_per_step
from turnout.trainer.metrics.compute import run_flops

SMALL = """\
name: s
overrides: ['model.d_model=32', 'model.n_layers=2', 'model.n_heads=2', 'model.ffn_dim=64',
            'model.moe.expert_ffn_dim=32', 'model.max_seq_len=32', 'launch.num_workers=1',
            'parallel.ep_size=1', 'train.micro_batch_size=2', 'train.warmup_steps=1']
"""


def _spec(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(SMALL + body)
    return path


def test_steps_are_the_budget_over_a_steps_counted_flops(tmp_path: Path) -> None:
    spec = load_spec(
        _spec(
            tmp_path,
            """grids:
  - budgets: [1.0e9, 4.0e9]
    seeds: [0, 3]
    axes:
      family: {dense: ['model.layer_pattern=[dense]'], moe: ['model.layer_pattern=[moe]']}
""",
        )
    )
    trials = expand(spec)
    assert len(trials) == 2 * 2 * 2
    for t in trials:
        cfg = load_config(spec.source, list(t.overrides))
        per_step = run_flops(cfg).per_token * tokens_per_step(cfg)
        assert t.steps == math.floor(t.budget / per_step) == cfg.train.steps
        assert cfg.train.seed == t.seed
        assert t.train_flops <= t.budget < t.train_flops + per_step
    moe = next(t for t in trials if t.labels == {"family": "moe"})
    assert moe.params_active < moe.params_total
    assert moe.id == "family=moe|b1e+09|s0" and moe.folder == "family=moe__b1e+09__s0"


def test_a_trial_two_grids_share_runs_once(tmp_path: Path) -> None:
    body = """grids:
  - name: lr
    budgets: [1.0e9]
    axes: {lr: {'3e-3': ['train.lr=3e-3'], '1e-2': ['train.lr=1e-2']}}
  - name: main
    budgets: [1.0e9, 2.0e9]
    axes: {lr: {'3e-3': ['train.lr=3e-3']}}
"""
    ids = [t.id for t in expand(load_spec(_spec(tmp_path, body)))]
    assert ids == ["lr=3e-3|b1e+09|s0", "lr=1e-2|b1e+09|s0", "lr=3e-3|b2e+09|s0"]


@pytest.mark.parametrize(
    "body,key",
    [
        ("grids: [{budgets: [1.0e9], axs: {}}]", "grids[0].axs"),
        ("grids: [{budgets: [lots]}]", "grids[0].budgets[0]"),
        ("grids: [{budgets: []}]", "grids[0].budgets"),
        ("grids: [{budgets: [-1.0]}]", "grids[0].budgets[0]"),
        ("grids: []", "grids"),
        ("grids: [{budgets: [1.0e9], seeds: [1, 1]}]", "grids[0].seeds"),
        ("grids: [{budgets: [1.0e9], axes: {'a b': {x: []}}}]", "grids[0].axes"),
        ("max_concurrent: -1\ngrids: [{budgets: [1.0e9]}]", "max_concurrent"),
    ],
)
def test_a_bad_spec_key_is_named(tmp_path: Path, body: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_spec(_spec(tmp_path, body))
    assert e.value.key == key


def test_a_bad_trial_config_names_grid_trial_and_key(tmp_path: Path) -> None:
    body = "grids: [{budgets: [1.0e9], axes: {m: {big: ['model.d_modle=64']}}}]"
    with pytest.raises(ConfigError) as e:
        expand(load_spec(_spec(tmp_path, body)))
    assert e.value.key == "grids[0] (0) trial m=big|b1e+09|s0: model.d_modle"


def test_a_budget_below_one_step_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        expand(load_spec(_spec(tmp_path, "grids: [{budgets: [1000.0]}]")))
    assert e.value.key.endswith(": budget") and "less than one step" in e.value.message


def test_the_command_says_one_line_and_starts_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    spec = _spec(tmp_path, "dir: sweeps\ngrids: [{budgets: [1.0e9], axes: {m: {x: ['nope=1']}}}]")
    assert main(["sweep", str(spec)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["turnout: error: grids[0] (0) trial m=x|b1e+09|s0: nope: unknown key"]
    assert not (tmp_path / "sweeps").exists()


def test_the_shipped_isoflop_spec_expands() -> None:
    from turnout.launch.sweep.driver import spec_file

    spec = load_spec(spec_file("isoflop"))
    trials = expand(spec)
    families = {t.labels["family"] for t in trials}
    assert families == {"dense", "moe", "mod", "mode", "exit", "mor"}
    assert all(t.steps >= 100 for t in trials)  # enough steps that the loss means something
    with pytest.raises(ConfigError) as e:
        spec_file("no-such-sweep")
    assert e.value.key == "sweep"
