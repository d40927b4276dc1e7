"""AdamW param groups and the DeepSpeed config derived from a TurnoutConfig."""

from __future__ import annotations

import pytest
import torch

from turnout.config import TurnoutConfig
from turnout.models.lm import TransformerLM
from turnout.trainer.engine import deepspeed_config, optimizer_param_groups, use_bf16

pytestmark = pytest.mark.unit


def _model() -> TransformerLM:
    cfg = TurnoutConfig().model
    cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.ffn_dim, cfg.max_seq_len = 16, 2, 2, 32, 8
    cfg.moe.num_experts, cfg.moe.expert_ffn_dim = 4, 16
    return TransformerLM(cfg)


def test_param_groups_cover_every_parameter_once() -> None:
    model = _model()
    groups = optimizer_param_groups(model, weight_decay=0.1)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    decay = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    for name, p in model.named_parameters():
        # Norm gains, biases and the (tied) embedding are not decayed; matrices are.
        expected = p.ndim >= 2 and not name.startswith("embed")
        assert (id(p) in decay) == expected, name
    assert id(model.layers[1].block.ffn.experts.w_up_EDF) in decay


def test_deepspeed_config_maps_train_settings() -> None:
    cfg = TurnoutConfig()
    cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.grad_clip = 3, 4, 0.5
    cfg.parallel.zero_stage = 1
    cfg.train.precision = "fp32"
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 3 * 4 * 2
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 1
    assert ds["zero_allow_untested_optimizer"] is True
    assert ds["bf16"]["enabled"] is False
    cfg.train.precision = "bf16"
    assert deepspeed_config(cfg, 2)["bf16"]["enabled"] is True


def test_auto_precision_is_bf16_only_on_capable_cuda() -> None:
    expected = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert use_bf16("auto") == expected
    assert use_bf16("fp32") is False and use_bf16("bf16") is True
