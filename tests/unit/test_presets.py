"""Every preset validates, and the cluster presets have the shapes they claim."""

from __future__ import annotations

import subprocess
import sys

import pytest

from turnout.config.load import load_config, preset_dir, preset_names, split_source, to_yaml

pytestmark = pytest.mark.unit

CLUSTER_PRESETS = ("mixtral-8x7b", "switch-base", "mod-paper", "mor-paper")


def test_presets_are_the_yaml_files() -> None:
    names = preset_names()
    assert names == sorted(p.stem for p in preset_dir().glob("*.yaml"))
    assert "tiny" in names
    for name in CLUSTER_PRESETS:
        assert name in names


@pytest.mark.parametrize("name", preset_names())
def test_preset_validates(name: str) -> None:
    cfg = load_config(name)
    # The resolved YAML round-trips through the loader unchanged.
    assert to_yaml(cfg) == to_yaml(load_config(str(preset_dir() / f"{name}.yaml")))


def test_tiny_is_the_laptop_default() -> None:
    cfg = load_config(None)
    assert cfg == load_config("tiny")
    assert cfg.launch.num_workers == 2 and not cfg.launch.use_gpu
    assert cfg.parallel.zero_stage == 2
    assert cfg.launch.num_workers % cfg.parallel.ep_size == 0
    assert cfg.model.moe.num_experts % cfg.parallel.ep_size == 0
    kinds = cfg.model.block_kinds()
    assert "mode" in kinds  # a MoDE model: MoD routing around an MoE block


def test_mixtral_like_shape() -> None:
    cfg = load_config("mixtral-8x7b")
    m = cfg.model
    assert (m.d_model, m.n_layers, m.n_heads) == (4096, 32, 32)
    assert m.kv_heads() == 8 and not m.tie_embeddings  # grouped-query, untied, as Mixtral
    assert m.block_kinds() == ["moe"] * 32
    assert (m.moe.num_experts, m.moe.top_k) == (8, 2)
    assert m.moe.capacity_factor is None  # dropless
    assert m.moe.gates_normalized()
    assert m.expert_hidden() == 14336
    assert m.rope_theta == 1e6
    assert cfg.launch.use_gpu and cfg.launch.num_workers % cfg.parallel.ep_size == 0
    assert m.moe.num_experts % cfg.parallel.ep_size == 0


def test_switch_like_shape() -> None:
    cfg = load_config("switch-base")
    m = cfg.model
    assert (m.d_model, m.n_layers, m.n_heads, m.ffn_dim) == (768, 12, 12, 3072)
    assert m.block_kinds() == ["dense", "moe"] * 6  # every other FFN is an MoE
    assert (m.moe.num_experts, m.moe.top_k) == (128, 1)
    assert not m.moe.gates_normalized()  # top-1 keeps the raw gate, as Switch does
    assert m.moe.capacity_factor == 1.25
    assert cfg.launch.use_gpu
    assert m.moe.num_experts % cfg.parallel.ep_size == 0


def test_mod_paper_like_shape() -> None:
    cfg = load_config("mod-paper")
    m = cfg.model
    kinds = m.block_kinds()
    assert kinds == ["dense", "mod"] * (m.n_layers // 2)  # routed blocks alternate
    assert m.mod.capacity == 0.125
    assert not m.uses_moe()
    assert m.mod.predictor == "mlp"
    assert cfg.launch.use_gpu


def test_mor_paper_like_shape() -> None:
    cfg = load_config("mor-paper")
    m = cfg.model
    assert m.block_kinds() == ["dense", "recursion", "dense"]  # Middle-Cycle sharing
    assert (m.recursion.max_recursions, m.recursion.group) == (3, 10)
    assert m.recursion.schedule() == [1.0, 2 / 3, 1 / 3]
    assert (m.d_model, m.n_heads, m.kv_heads()) == (576, 9, 3)
    assert cfg.launch.use_gpu


def test_tiny_mor_is_a_laptop_recursion_model() -> None:
    cfg = load_config("tiny-mor")
    assert cfg.model.uses_recursion() and not cfg.launch.use_gpu
    assert cfg.launch.num_workers == 2


def test_cli_lists_every_preset() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "turnout.launch.cli", "presets"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    assert listed == preset_names()


def test_cli_show_prints_the_resolved_config() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "turnout.launch.cli", "show", "switch-base", "train.steps=7"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "num_experts: 128" in proc.stdout
    assert "steps: 7" in proc.stdout


def test_split_source_takes_the_first_item_without_equals() -> None:
    assert split_source(["tiny", "a.b=1"]) == ("tiny", ["a.b=1"])
    assert split_source(["x.yaml"]) == ("x.yaml", [])
    assert split_source(["a.b=1", "c=2"]) == (None, ["a.b=1", "c=2"])
    assert split_source([]) == (None, [])


def test_tiny_hyper_is_tiny_with_hyper_experts() -> None:
    import dataclasses

    cfg, tiny = load_config("tiny-hyper"), load_config("tiny")
    assert cfg.model.moe.hyper.enabled and not tiny.model.moe.hyper.enabled
    plain = dataclasses.replace(cfg.model.moe, hyper=tiny.model.moe.hyper)
    assert dataclasses.replace(cfg.model, moe=plain) == tiny.model
