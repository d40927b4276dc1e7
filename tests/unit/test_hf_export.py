"""``--format hf``: a dense model loads as HF Llama (Qwen3 with q/k norms), a MoE model as
HF Mixtral (Qwen3-MoE with q/k norms), with our logits.

No download: ``transformers`` builds the model from the folder's config.json alone. The
weights are random with non-unit norm weights, a non-default RoPE base and eps, and
grouped-query attention, so a wrong mapping of any of them shows in the logits.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from tests.unit.test_hf_import import logits_match_hf
from turnout.config import TurnoutConfig
from turnout.config.hyper import HyperConfig
from turnout.config.model import ModelConfig, MoEConfig
from turnout.errors import ConfigError
from turnout.models.lm import TransformerLM
from turnout.trainer.weights.hf_format import HF_CONFIG, HF_WEIGHTS, write_hf

transformers = pytest.importorskip("transformers")


def _cfg(pattern: list[str], tied: bool = True, **moe: object) -> ModelConfig:
    moe_cfg = dict(num_experts=4, top_k=2, capacity_factor=None, expert_ffn_dim=24)
    moe_cfg.update(moe)
    return ModelConfig(
        vocab_size=64,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=48,
        max_seq_len=16,
        rope_theta=500.0,
        norm_eps=1e-6,
        init_std=0.2,
        tie_embeddings=tied,
        layer_pattern=pattern,
        moe=MoEConfig(**moe_cfg),  # type: ignore[arg-type]
    )


def _qwen(pattern: list[str], **moe: object) -> ModelConfig:
    """Qwen3's attention: q/k norms and heads wider than d_model / n_heads."""
    return dataclasses.replace(_cfg(pattern, False, **moe), head_dim=12, qk_norm=True)


def _model(m: ModelConfig) -> TransformerLM:
    torch.manual_seed(0)
    model = TransformerLM(m).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.3)
    return model


@pytest.mark.parametrize(
    ("m", "arch"),
    [
        (_cfg(["dense"], True), "llama"),
        (_cfg(["dense"], False), "llama"),
        (_cfg(["moe"], False), "mixtral"),
        (_qwen(["dense"]), "qwen3"),
        (_qwen(["moe", "dense"], normalize_gates=False), "qwen3_moe"),
    ],
    ids=["llama-tied", "llama", "mixtral", "qwen3", "qwen3_moe"],
)
def test_hf_logits_equal_ours(tmp_path: Path, m: ModelConfig, arch: str) -> None:
    model = _model(m)
    got_arch, _ = write_hf(tmp_path, TurnoutConfig(model=m), model.state_dict())
    assert got_arch == arch
    assert (tmp_path / HF_CONFIG).is_file() and (tmp_path / HF_WEIGHTS).is_file()
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, local_files_only=True, output_loading_info=True, dtype=torch.float32
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert hf.config.model_type == arch
    hf.eval()
    tokens_BS = torch.randint(
        0, m.vocab_size, (3, m.max_seq_len), generator=torch.Generator().manual_seed(1)
    )
    logits_match_hf(model, hf, tokens_BS)


@pytest.mark.parametrize(
    ("pattern", "moe", "key"),
    [
        (["dense", "mod"], {}, "model.layer_pattern"),
        (["dense", "moe"], {}, "model.layer_pattern"),
        (["dense", "ponder"], {}, "model.layer_pattern"),
        (["dense", "recursion"], {}, "model.layer_pattern"),
        (["imode"], {"num_noop_experts": 1}, "model.moe.num_noop_experts"),
        (["moe"], {"top_k": 1}, "model.moe.normalize_gates"),
        (["moe"], {"capacity_factor": 1.25}, "model.moe.capacity_factor"),
        (["moe"], {"shared_experts": 1}, "model.moe.shared_experts"),
        (["moe"], {"hyper": HyperConfig(enabled=True)}, "model.moe.hyper.enabled"),
    ],
)
def test_hf_refuses_what_it_cannot_express(
    tmp_path: Path, pattern: list[str], moe: dict, key: str
) -> None:
    m = _cfg(pattern, **moe)
    with pytest.raises(ConfigError) as err:
        write_hf(tmp_path / "out", TurnoutConfig(model=m), TransformerLM(m).state_dict())
    assert err.value.key == key
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_hf_capacity_model_exports_with_allow_dropless(tmp_path: Path) -> None:
    m = _cfg(["moe"], capacity_factor=1.25)
    arch, _ = write_hf(tmp_path, TurnoutConfig(model=m), TransformerLM(m).state_dict(), True)
    assert arch == "mixtral"


def test_hf_refuses_a_selection_bias(tmp_path: Path) -> None:
    m = _cfg(["moe"])
    state = TransformerLM(m).state_dict()
    state["layers.0.ffn.expert_bias"] = torch.tensor([0.0, 0.1, 0.0, 0.0])
    with pytest.raises(ConfigError) as err:
        write_hf(tmp_path, TurnoutConfig(model=m), state)
    assert err.value.key == "model.moe.balance"
