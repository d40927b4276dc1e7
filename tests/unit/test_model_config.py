"""validate_model: each bad model config raises ConfigError naming its dotted key."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch

from turnout.config.model import (
    BLOCK_KINDS,
    FFN_MOE,
    MoDConfig,
    ModelConfig,
    MoEConfig,
    validate_model,
)
from turnout.errors import ConfigError
from turnout.models.lm import TransformerLM

pytestmark = pytest.mark.unit


def _set(path: str, value: object) -> Callable[[ModelConfig], None]:
    def apply(cfg: ModelConfig) -> None:
        *parents, leaf = path.split(".")
        obj: object = cfg
        for p in parents:
            obj = getattr(obj, p)
        setattr(obj, leaf, value)

    return apply


def _both(*edits: Callable[[ModelConfig], None]) -> Callable[[ModelConfig], None]:
    def apply(cfg: ModelConfig) -> None:
        for e in edits:
            e(cfg)

    return apply


BAD: list[tuple[str, Callable[[ModelConfig], None], str]] = [
    ("vocab-zero", _set("vocab_size", 0), "model.vocab_size"),
    ("d_model-neg", _set("d_model", -8), "model.d_model"),
    ("n_layers-zero", _set("n_layers", 0), "model.n_layers"),
    ("n_heads-zero", _set("n_heads", 0), "model.n_heads"),
    ("ffn-zero", _set("ffn_dim", 0), "model.ffn_dim"),
    ("seq-zero", _set("max_seq_len", 0), "model.max_seq_len"),
    ("theta-zero", _set("rope_theta", 0.0), "model.rope_theta"),
    ("eps-neg", _set("norm_eps", -1e-5), "model.norm_eps"),
    ("init-zero", _set("init_std", 0.0), "model.init_std"),
    ("heads-not-dividing", _set("n_heads", 3), "model.n_heads"),
    ("odd-head-dim", _both(_set("d_model", 24), _set("n_heads", 8)), "model.n_heads"),
    ("kv-heads-not-dividing", _set("n_kv_heads", 3), "model.n_kv_heads"),
    ("kv-heads-neg", _set("n_kv_heads", -2), "model.n_kv_heads"),
    ("empty-pattern", _set("layer_pattern", []), "model.layer_pattern"),
    ("unknown-kind", _set("layer_pattern", ["dense", "moee"]), "model.layer_pattern[1]"),
    ("experts-zero", _set("moe.num_experts", 0), "model.moe.num_experts"),
    ("topk-zero", _set("moe.top_k", 0), "model.moe.top_k"),
    ("topk-gt-E", _set("moe.top_k", 9), "model.moe.top_k"),
    (
        "topk-gt-E-moe-beside-imode",  # the no-op experts only widen the imode routers
        _both(
            _set("layer_pattern", ["moe", "imode"]),
            _set("moe.num_noop_experts", 2),
            _set("moe.top_k", 9),
        ),
        "model.moe.top_k",
    ),
    ("cf-zero", _set("moe.capacity_factor", 0.0), "model.moe.capacity_factor"),
    ("cf-neg", _set("moe.capacity_factor", -1.0), "model.moe.capacity_factor"),
    ("cf-inf", _set("moe.capacity_factor", float("inf")), "model.moe.capacity_factor"),
    ("cf-nan", _set("moe.capacity_factor", float("nan")), "model.moe.capacity_factor"),
    ("min-cap-neg", _set("moe.min_capacity", -1), "model.moe.min_capacity"),
    ("expert-ffn-neg", _set("moe.expert_ffn_dim", -1), "model.moe.expert_ffn_dim"),
    ("aux-coef-neg", _set("moe.aux_loss_coef", -0.1), "model.moe.aux_loss_coef"),
    ("z-coef-neg", _set("moe.z_loss_coef", -0.1), "model.moe.z_loss_coef"),
    ("noop-neg", _set("moe.num_noop_experts", -1), "model.moe.num_noop_experts"),
    ("imode-no-noop", _set("layer_pattern", ["dense", "imode"]), "model.moe.num_noop_experts"),
    ("mod-cap-zero", _set("mod.capacity", 0.0), "model.mod.capacity"),
    ("mod-cap-gt1", _set("mod.capacity", 1.5), "model.mod.capacity"),
    ("predictor", _set("mod.predictor", "lstm"), "model.mod.predictor"),
    ("router-gate", _set("mod.router_gate", "softmax"), "model.mod.router_gate"),
    ("pred-hidden-zero", _set("mod.predictor_hidden", 0), "model.mod.predictor_hidden"),
    ("pred-coef-neg", _set("mod.predictor_loss_coef", -1.0), "model.mod.predictor_loss_coef"),
    ("router-input", _set("moe.router_input", "attn"), "model.moe.router_input"),
    (
        "router-input-block-beside-moe",  # 'block' is for mode blocks; moe would be ambiguous
        _both(_set("layer_pattern", ["moe", "mode"]), _set("moe.router_input", "block")),
        "model.moe.router_input",
    ),
    (
        "router-input-block-without-mode",
        _both(_set("layer_pattern", ["dense", "mod"]), _set("moe.router_input", "block")),
        "model.moe.router_input",
    ),
]


@pytest.mark.parametrize(("edit", "key"), [(e, k) for _, e, k in BAD], ids=[n for n, _, _ in BAD])
def test_bad_model_config_names_the_key(edit: Callable[[ModelConfig], None], key: str) -> None:
    cfg = ModelConfig()
    edit(cfg)
    with pytest.raises(ConfigError) as info:
        validate_model(cfg)
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}: ")
    assert "\n" not in str(info.value)


def test_prefix_is_used_in_the_key() -> None:
    cfg = ModelConfig(moe=MoEConfig(top_k=9))
    with pytest.raises(ConfigError) as info:
        validate_model(cfg, prefix="student")
    assert info.value.key == "student.moe.top_k"


GOOD = [
    ModelConfig(),
    ModelConfig(layer_pattern=["imode"], moe=MoEConfig(num_experts=2, top_k=3, num_noop_experts=1)),
    ModelConfig(moe=MoEConfig(capacity_factor=None, min_capacity=0)),
    ModelConfig(layer_pattern=["dense"], mod=MoDConfig(capacity=1.0, predictor="router")),
    ModelConfig(d_model=8, n_heads=4, moe=MoEConfig(num_experts=1, top_k=1)),
    ModelConfig(n_heads=4, n_kv_heads=2),
    ModelConfig(n_heads=4, n_kv_heads=1, layer_pattern=["mod", "moe"]),
    ModelConfig(layer_pattern=["dense", "mod", "mode"], moe=MoEConfig(router_input="block")),
]


@pytest.mark.parametrize("cfg", GOOD, ids=range(len(GOOD)))
def test_good_model_configs_validate_and_build(cfg: ModelConfig) -> None:
    validate_model(cfg)
    small = copy.deepcopy(cfg)
    small.n_layers, small.max_seq_len = len(small.layer_pattern), 8
    lm = TransformerLM(small)
    out = lm(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))
    assert torch.isfinite(out.loss)


def test_block_kinds_cycle_the_pattern() -> None:
    cfg = ModelConfig(n_layers=5, layer_pattern=["dense", "mode"])
    assert cfg.block_kinds() == ["dense", "mode", "dense", "mode", "dense"]
    assert cfg.uses_moe() and cfg.uses_mod()
    cfg = ModelConfig(n_layers=2, layer_pattern=["dense", "imode"])
    assert cfg.uses_moe() and not cfg.uses_mod()
    assert ModelConfig(ffn_dim=96).expert_hidden() == 96
    assert ModelConfig(moe=MoEConfig(expert_ffn_dim=40)).expert_hidden() == 40


def test_gates_normalized_default_follows_top_k() -> None:
    assert MoEConfig(top_k=1).gates_normalized() is False
    assert MoEConfig(top_k=2).gates_normalized() is True
    assert MoEConfig(top_k=1, normalize_gates=True).gates_normalized() is True
    assert MoEConfig(top_k=2, normalize_gates=False).gates_normalized() is False


def test_block_kind_table_drives_uses_moe_and_uses_mod() -> None:
    for name, kind in BLOCK_KINDS.items():
        cfg = ModelConfig(layer_pattern=[name], n_layers=1)
        assert cfg.blocks() == [kind]
        assert cfg.uses_moe() == (kind.ffn == FFN_MOE)
        assert cfg.uses_mod() == kind.mod_routed
    assert [k for k, v in BLOCK_KINDS.items() if v.noop_experts] == ["imode"]
