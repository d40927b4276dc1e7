"""``train.init_from``: export folders round-trip, upcycled models start as their source.

Sources are written with the export writer from a live model (the same files
``turnout export`` writes); the new model is built from its own config and seed, then
:func:`init_from` maps the source in. The claims of :mod:`turnout.trainer.weights.upcycle`:
dense -> MoE with renormalised gates, dropless; E -> 2E with top_k doubled, under
capacity dropping too (the test checks assignments really are dropped).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.decisions import recorded
from turnout.config import TurnoutConfig
from turnout.config.hyper import HyperConfig
from turnout.config.load import load_config
from turnout.config.model import MoDConfig, ModelConfig, MoEConfig
from turnout.errors import ConfigError
from turnout.launch.cli import main
from turnout.models.lm import TransformerLM
from turnout.models.pretrained import WEIGHTS_FILE
from turnout.models.terms import Term
from turnout.trainer.weights.export import write_turnout
from turnout.trainer.weights.upcycle import check_init_from, init_from


def _model_cfg(pattern: list[str], **moe: object) -> ModelConfig:
    moe_cfg: dict = dict(num_experts=4, top_k=2, capacity_factor=None, min_capacity=1)
    moe_cfg.update(moe)
    return ModelConfig(
        vocab_size=48,
        d_model=32,
        n_layers=2,
        n_heads=4,
        ffn_dim=40,
        max_seq_len=16,
        init_std=0.1,
        layer_pattern=pattern,
        moe=MoEConfig(**moe_cfg),
        mod=MoDConfig(capacity=0.5),
    )


def _source(tmp: Path, m: ModelConfig, seed: int = 0) -> tuple[TransformerLM, Path]:
    torch.manual_seed(seed)
    model = TransformerLM(m).eval()
    folder = tmp / "source"
    write_turnout(folder, model.state_dict(), TurnoutConfig(model=m), step=5)
    return model, folder


def _target(m: ModelConfig, source: Path, **train: object) -> tuple[TransformerLM, TurnoutConfig]:
    cfg = TurnoutConfig(model=m)
    cfg.train.init_from = str(source)
    for k, v in train.items():
        setattr(cfg.train, k, v)
    check_init_from(cfg)
    torch.manual_seed(123)  # another seed than the source's: nothing matches by chance
    model = TransformerLM(m)
    init_from(model, cfg)
    return model.eval(), cfg


TOKENS_BS = torch.randint(0, 48, (4, 16), generator=torch.Generator().manual_seed(3))


def _logits(model: TransformerLM) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS_BS).logits


def test_export_round_trip_stores_tied_weights_once(tmp_path: Path) -> None:
    model, folder = _source(tmp_path, _model_cfg(["dense", "mode"]))
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as f:
        keys = set(f.keys())  # noqa: SIM118 - not a dict
        assert f.metadata()["turnout.step"] == "5"
    assert "embed.weight" in keys and "head.weight" not in keys
    loaded = TransformerLM.from_pretrained(folder)
    assert loaded.head.weight is loaded.embed.weight
    # Bitwise: the same weights through the same modules and kernels (so the same routing).
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=0, rtol=0)


@pytest.mark.parametrize(
    ("src", "dst", "moe"),
    [
        (["dense"], ["moe"], {}),
        (["dense", "mod"], ["moe", "mode"], {}),
        # New hyper-experts start with a zero adapter: still the source's function.
        (["dense"], ["moe"], {"hyper": HyperConfig(enabled=True)}),
    ],
)
def test_dense_to_moe_first_forward_equals_source(
    tmp_path: Path, src: list[str], dst: list[str], moe: dict
) -> None:
    source, folder = _source(tmp_path, _model_cfg(src))
    target, _ = _target(_model_cfg(dst, **moe), folder)
    bank = target.layers[0].ffn.experts
    assert torch.equal(bank.w_gate_EDF[3], source.layers[0].ffn.w_gate.weight.t())
    with recorded(source) as decisions:
        want = _logits(source)
    # The expert copies are identical, so the target's expert choice does not matter; its
    # MoD top-k does, and reads layer 0's output, which the gate-weighted sum of copies
    # rounds otherwise than the dense FFN.
    decisions.assert_clear("the source's MoD top-k")
    # ~5e-7 measured on logits of magnitude ~3: 1e-5 leaves 20x.
    torch.testing.assert_close(_logits(target), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_e_to_2e_first_forward_equals_source(tmp_path: Path, capacity_factor: float | None) -> None:
    src = _model_cfg(["moe"], capacity_factor=capacity_factor)
    source, folder = _source(tmp_path, src)
    target, _ = _target(
        _model_cfg(["moe"], num_experts=8, top_k=4, capacity_factor=capacity_factor), folder
    )
    router = target.layers[0].ffn.router_DE
    assert router.shape == (32, 8)
    assert torch.equal(router[:, 2], router[:, 3])  # expert 1's two copies
    with torch.no_grad(), recorded(source) as decisions:
        out = source(TOKENS_BS)
    # The target's top-4 cut (between both copies of the source's 2nd and 3rd expert) reads
    # logits of a [D, 8] router GEMM, the source's top-2 those of a [D, 4] one.
    decisions.assert_clear("the source's expert top-2")
    if capacity_factor is not None:  # the claim holds with drops, not only without
        assert float(out.stats[0][Term.MOE_DROP]) > 0
    # ~5e-7 measured on logits of magnitude ~3: 1e-5 leaves 20x.
    torch.testing.assert_close(_logits(target), out.logits, atol=1e-5, rtol=1e-5)


def test_e_to_2e_carries_the_hyper_experts(tmp_path: Path) -> None:
    src = _model_cfg(["moe"], hyper=HyperConfig(enabled=True))
    torch.manual_seed(0)
    source = TransformerLM(src).eval()
    with torch.no_grad():  # a trained adapter, not the zero one a fresh model starts with
        source.hyper.up_HrD.normal_(std=0.1)
    folder = tmp_path / "source"
    write_turnout(folder, source.state_dict(), TurnoutConfig(model=src), step=5)
    target, _ = _target(
        _model_cfg(["moe"], num_experts=8, top_k=4, hyper=HyperConfig(enabled=True)), folder
    )
    emb = target.layers[0].ffn.hyper_emb_RC
    assert torch.equal(emb[2], emb[3]) and torch.equal(emb[2], source.layers[0].ffn.hyper_emb_RC[1])
    with torch.no_grad(), recorded(source) as decisions:
        out = source(TOKENS_BS)
    decisions.assert_clear("the source's expert top-2")
    assert float(out.stats[0][Term.MOE_HYPER]) > 0  # the adapter takes part
    # The copies split each unselected expert's probability in two, so the weighted mean
    # embedding, hence the adapter, is the source's up to rounding; 1e-5 as above.
    torch.testing.assert_close(_logits(target), out.logits, atol=1e-5, rtol=1e-5)


def test_noise_and_reinit_perturb_each_expert_deterministically(tmp_path: Path) -> None:
    source, folder = _source(tmp_path, _model_cfg(["dense"]))
    dense_DF = source.layers[0].ffn.w_gate.weight.t()
    a, _ = _target(_model_cfg(["moe"]), folder, upcycle_noise=0.01, upcycle_reinit=0.25)
    b, _ = _target(_model_cfg(["moe"]), folder, upcycle_noise=0.01, upcycle_reinit=0.25)
    gate_EDF = a.layers[0].ffn.experts.w_gate_EDF
    assert torch.equal(gate_EDF, b.layers[0].ffn.experts.w_gate_EDF)  # seeded: every rank agrees
    assert not torch.equal(gate_EDF[0], gate_EDF[1])
    for e in range(4):
        ratio_DF = gate_EDF[e] / dense_DF
        kept_F = ((ratio_DF - 1).abs() < 0.1).all(0)  # noise only: within a few std of 1
        assert int((~kept_F).sum()) == 10  # 25% of 40 hidden units re-drawn
    torch.testing.assert_close(a.layers[0].attn.qkv.weight, source.layers[0].attn.qkv.weight)


@pytest.mark.parametrize(
    ("dst", "key"),
    [
        (_model_cfg(["moe"], num_experts=6, top_k=2), "model.moe.num_experts"),
        (_model_cfg(["dense"]), "model.layer_pattern"),
        (_model_cfg(["moe"], expert_ffn_dim=24), "model.moe.expert_ffn_dim"),
    ],
)
def test_mismatched_source_refused_naming_the_key(
    tmp_path: Path, dst: ModelConfig, key: str
) -> None:
    _, folder = _source(tmp_path, _model_cfg(["moe"]))
    cfg = TurnoutConfig(model=dst)
    cfg.train.init_from = str(folder)
    with pytest.raises(ConfigError) as err:
        check_init_from(cfg)
    assert err.value.key == key


def test_cli_refuses_a_mismatch_before_workers_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, folder = _source(tmp_path, load_config("tiny").model)
    code = main(
        ["train", "tiny", f"train.init_from={folder}", "model.d_model=64", "tracking.enabled=false"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "model.d_model" in err[0] and "train.init_from" in err[0], err


def test_not_a_source_is_refused(tmp_path: Path) -> None:
    cfg = TurnoutConfig()
    cfg.train.init_from = str(tmp_path)
    with pytest.raises(ConfigError) as err:
        check_init_from(cfg)
    assert err.value.key == "train.init_from"
