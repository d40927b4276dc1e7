"""Retrofitting MoD routing and early exits onto a dense source (``train.init_from``), and
``train.trainable`` (which parameters train)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from tests.unit.test_upcycle import TOKENS_BS, _logits, _model_cfg, _source, _target
from turnout.config import TurnoutConfig
from turnout.config.load import load_config
from turnout.config.model import ExitConfig, ModelConfig
from turnout.errors import ConfigError
from turnout.models.lm import TransformerLM
from turnout.models.mod import MoDBlock
from turnout.trainer.trainable import apply_trainable
from turnout.trainer.weights.upcycle import check_init_from


def _with_mod(m: ModelConfig, capacity: float, gate: str = "sigmoid") -> ModelConfig:
    m.mod.capacity = capacity
    m.mod.router_gate = gate
    return m


def _reference(
    source: TransformerLM, routed: set[int], g: float, tokens_BS: torch.Tensor = TOKENS_BS
) -> torch.Tensor:
    """The source's forward with routed layers' increments scaled by ``g`` (every token)."""
    B, S = tokens_BS.shape
    pos_BS = torch.arange(S).unsqueeze(0).expand(B, S)
    with torch.no_grad():
        x_BSD = source.embed(tokens_BS)
        for i, block in enumerate(source.layers):
            y_BSD, _ = block(x_BSD, pos_BS)
            x_BSD = x_BSD + g * (y_BSD - x_BSD) if i in routed else y_BSD
        return source.head(source.norm(x_BSD))


@pytest.mark.parametrize(("gate", "g"), [("sigmoid", 0.5), ("identity", 0.0)])
def test_capacity_1_first_forward_is_the_stated_one(
    tmp_path: Path, gate: str, g: float, caplog: pytest.LogCaptureFixture
) -> None:
    source, folder = _source(tmp_path, _model_cfg(["dense", "dense"]))
    with caplog.at_level(logging.INFO, logger="turnout.trainer"):
        target, _ = _target(_with_mod(_model_cfg(["dense", "mod"]), 1.0, gate), folder)
    assert torch.equal(target.layers[1].router.weight, torch.zeros(1, 32))
    assert torch.equal(target.layers[1].block.attn.qkv.weight, source.layers[1].attn.qkv.weight)
    lines = [r.getMessage() for r in caplog.records if "retrofit" in r.getMessage()]
    assert len(lines) == 1 and "layers [1]" in lines[0] and "every token" in lines[0], lines
    # x + g * (block(x) - x) against the MoD block's x + g * increment: the same terms
    # rounded in another order: 3.6e-7 measured on logits up to ~2.5; 1e-5 leaves ~30x.
    torch.testing.assert_close(_logits(target), _reference(source, {1}, g), atol=1e-5, rtol=1e-5)
    if g == 0.0:  # the identity gate at zero: the routed block adds exactly nothing
        torch.testing.assert_close(_logits(target), _reference(source, {1}, 0.0), atol=0, rtol=0)


def test_capacity_below_1_states_the_skipped_fraction(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, folder = _source(tmp_path, _model_cfg(["dense", "dense"]))
    with caplog.at_level(logging.INFO, logger="turnout.trainer"):
        target, _ = _target(_with_mod(_model_cfg(["dense", "mod"]), 0.125), folder)
    line = next(r.getMessage() for r in caplog.records if "retrofit" in r.getMessage())
    assert "2 of 16 positions run them, 87.5% of each sequence skips them" in line, line
    with torch.no_grad():
        out = target(TOKENS_BS)
    assert out.logits.isfinite().all()


def test_dense_to_mode_upcycles_and_retrofits_at_once(tmp_path: Path) -> None:
    source, folder = _source(tmp_path, _model_cfg(["dense", "dense"]))
    target, _ = _target(_with_mod(_model_cfg(["dense", "mode"]), 1.0), folder)
    bank = target.layers[1].block.ffn.experts
    assert torch.equal(bank.w_gate_EDF[2], source.layers[1].ffn.w_gate.weight.t())


def test_exits_share_the_final_head_and_keep_the_final_logits(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source, folder = _source(tmp_path, _model_cfg(["dense", "dense"]))
    m = _model_cfg(["dense", "dense"])
    m.exit = ExitConfig(layers=[1])
    with caplog.at_level(logging.INFO, logger="turnout.trainer"):
        target, _ = _target(m, folder)
    assert any("early exits at depths [1]" in r.getMessage() for r in caplog.records)
    # Bitwise: the same weights through the same modules (an exit adds no weight).
    torch.testing.assert_close(_logits(target), _logits(source), atol=0, rtol=0)


def test_removing_mod_routing_is_refused(tmp_path: Path) -> None:
    _, folder = _source(tmp_path, _model_cfg(["dense", "mod"]))
    cfg = TurnoutConfig(model=_model_cfg(["dense", "dense"]))
    cfg.train.init_from = str(folder)
    with pytest.raises(ConfigError) as err:
        check_init_from(cfg)
    assert err.value.key == "model.layer_pattern" and "cannot be removed" in err.value.message


ROUTER = {"layers.1.router.weight"} | {
    f"layers.1.predictor.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")
}  # the default causal predictor: an MLP, trained with the router


@pytest.mark.parametrize(
    ("mode", "want"),
    [
        ("routers", ROUTER),
        (
            "routers+norms",
            ROUTER
            | {
                "layers.0.norm_attn.weight",
                "layers.0.norm_ffn.weight",
                "layers.1.block.norm_attn.weight",
                "layers.1.block.norm_ffn.weight",
                "norm.weight",
            },
        ),
    ],
)
def test_trainable_freezes_all_but_the_routers(mode: str, want: set[str]) -> None:
    model = TransformerLM(_with_mod(_model_cfg(["dense", "mod"]), 0.5))
    trained, total = apply_trainable(model, mode)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == want
    assert trained == sum(p.numel() for n, p in model.named_parameters() if n in want)
    assert total == sum(p.numel() for p in model.parameters())
    assert apply_trainable(model, "all") == (total, total)


def test_trainable_includes_moe_routers() -> None:
    model = TransformerLM(_model_cfg(["moe"]))
    apply_trainable(model, "routers")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "layers.0.ffn.router_DE",
        "layers.1.ffn.router_DE",
    }


def test_trainable_routers_without_routers_is_one_line_naming_the_key() -> None:
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["model.layer_pattern=[dense]", "train.trainable=routers"])
    assert err.value.key == "train.trainable" and "no routed block" in err.value.message
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["train.trainable=experts"])
    assert err.value.key == "train.trainable"


def test_retrofit_from_an_hf_llama_folder(tmp_path: Path) -> None:
    import dataclasses

    from tests.unit.test_hf_import import _hf_model, _tokens
    from turnout.models.pretrained import read_export
    from turnout.trainer.weights.hf_import import import_hf
    from turnout.trainer.weights.upcycle import init_from

    _hf_model("llama", tmp_path / "hf")
    done = import_hf(tmp_path / "hf", tmp_path / "ours")
    _, dense, _ = read_export(done.folder)
    source = TransformerLM.from_pretrained(done.folder).eval()
    mod = dataclasses.replace(dense.model.mod, capacity=1.0)
    run = TurnoutConfig(
        model=dataclasses.replace(dense.model, layer_pattern=["dense", "mod"], mod=mod)
    )
    run.train.init_from = str(tmp_path / "hf")
    assert check_init_from(run) is not None
    model = TransformerLM(run.model).eval()
    init_from(model, run)
    routed = set(range(1, run.model.n_layers, 2))
    assert routed and all(isinstance(model.layers[i], MoDBlock) for i in routed)
    with torch.no_grad():
        got_BSV = model(_tokens()).logits
    # As in test_capacity_1_first_forward_is_the_stated_one: the same terms in another order.
    torch.testing.assert_close(
        got_BSV, _reference(source, routed, 0.5, _tokens()), atol=1e-5, rtol=1e-5
    )
