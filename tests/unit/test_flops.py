"""FLOP accounting (models/flops.py) against hand counts and torch's FlopCounterMode."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from turnout.config.model import (
    ExitConfig,
    MoDConfig,
    ModelConfig,
    MoEConfig,
    PonderConfig,
    validate_model,
)
from turnout.models.flops import dense_counterpart, expected_flops, forward_flops
from turnout.models.lm import TransformerLM
from turnout.models.params import count_params

pytestmark = pytest.mark.unit


def _cfg(pattern: list[str], **moe: object) -> ModelConfig:
    return ModelConfig(
        vocab_size=64,
        d_model=32,
        n_layers=2,
        n_heads=4,
        ffn_dim=64,
        max_seq_len=24,
        layer_pattern=pattern,
        moe=MoEConfig(num_experts=4, top_k=2, capacity_factor=1.25, min_capacity=2, **moe),
        mod=MoDConfig(capacity=0.25, predictor_hidden=16),
    )


def test_dense_hand_count() -> None:
    cfg = _cfg(["dense"])
    D, F, S, V = 32, 64, 24, 64
    per_block = 2 * D * 3 * D + 2 * D * D + 4 * S * D + 3 * 2 * D * F
    assert forward_flops(cfg).per_token == 2 * per_block + 2 * D * V
    assert forward_flops(cfg).train_per_token == 3 * forward_flops(cfg).per_token


def test_mod_hand_count() -> None:
    cfg = _cfg(["mod"])
    D, F, S, h = 32, 64, 24, 16
    M = 6  # ceil(0.25 * 24)
    block = forward_flops(cfg).blocks[0]
    assert block.attention * S == M * (2 * D * 3 * D + 2 * D * D) + 4 * M * M * D
    assert block.ffn * S == M * 3 * 2 * D * F
    assert block.routing * S == S * (2 * D + 2 * D * h + 2 * h)


def test_moe_capacity_padding_is_counted() -> None:
    cfg = _cfg(["moe"])
    B, S, D, E, k = 3, 24, 32, 4, 2
    C = -(-int(1.25 * B * S * k) // E)  # ceil(cf * T * k / E) = 45
    block = forward_flops(cfg, batch=B).blocks[0]
    assert block.ffn == pytest.approx(E * C * 3 * 2 * D * 64 / (B * S))
    assert block.routing == 2 * D * E
    dropless = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, capacity_factor=None))
    assert forward_flops(dropless, batch=B).blocks[0].ffn == k * 3 * 2 * D * 64


def test_expert_parallel_exchange_counts_kept_rows_only() -> None:
    """ep > 1 sends and computes no padding: the real rows, capped by the buckets."""
    cfg = _cfg(["moe"])
    B, S, D, E, k = 3, 24, 32, 4, 2
    T = B * S
    block = forward_flops(cfg, batch=B, expert_padding=False).blocks[0]
    assert block.ffn == pytest.approx(k * 3 * 2 * D * 64)  # T * k rows over T tokens
    assert block.ffn < forward_flops(cfg, batch=B).blocks[0].ffn
    tight = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, capacity_factor=0.5))
    C = -(-int(0.5 * T * k) // E)  # buckets smaller than the assignments: drops
    rows = forward_flops(tight, batch=B, expert_padding=False).blocks[0].ffn * T / (3 * 2 * D * 64)
    assert rows == pytest.approx(E * C)
    dropless = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, capacity_factor=None))
    assert forward_flops(dropless, batch=B, expert_padding=False) == forward_flops(
        dropless, batch=B
    )


def test_routed_models_cost_less_than_their_dense_counterpart() -> None:
    for pattern in (["dense", "mod"], ["dense", "mode"]):
        cfg = _cfg(pattern)
        dense = forward_flops(dense_counterpart(cfg))
        assert forward_flops(cfg).fraction_of(dense) < 1.0


# Both sides are integer FLOP counts of fixed shapes (capacity buckets, exactly k MoD
# positions), so no float rounding or routing decision enters: they agree exactly today.
# COUNT_REL (0.5%) only leaves room for an op another torch's FlopCounterMode counts.
COUNT_REL = 0.005


def _counted_flops_per_token(cfg: ModelConfig, batch: int) -> tuple[float, TransformerLM]:
    """FlopCounterMode's forward FLOPs per token of a fresh model of ``cfg`` (and the model)."""
    torch.manual_seed(0)
    model = TransformerLM(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_len))
    # The math SDPA backend decomposes attention into counted bmm calls.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(tokens)
    return fc.get_total_flops() / (batch * cfg.max_seq_len), model


@pytest.mark.parametrize(
    "pattern,moe",
    [
        (["dense"], {}),
        (["dense", "mod"], {}),
        (["moe"], {}),
        (["dense", "mode"], {}),
        (["dense", "mode"], {"router_input": "block"}),
        (["imode"], {"num_noop_experts": 2}),
    ],
)
@pytest.mark.parametrize("predictor", ["mlp", "router"])
def test_agrees_with_torch_flop_counter(pattern: list[str], moe: dict, predictor: str) -> None:
    cfg = _cfg(pattern, **moe)
    cfg.mod.predictor = predictor
    B = 3
    counted, _ = _counted_flops_per_token(cfg, B)
    assert forward_flops(cfg, batch=B).per_token == pytest.approx(counted, rel=COUNT_REL)


def test_grouped_query_attention_hand_count() -> None:
    cfg = dataclasses.replace(_cfg(["dense"]), n_heads=4, n_kv_heads=2)
    D, S = 32, 24
    kv_dim = 2 * (D // 4)  # 2 K/V heads of head dim 8
    block = forward_flops(cfg).blocks[0]
    assert block.attention * S == S * (2 * D * (D + 2 * kv_dim) + 2 * D * D) + 4 * S * S * D
    full = forward_flops(_cfg(["dense"])).blocks[0]
    assert full.attention - block.attention == 2 * 2 * D * (D - kv_dim)  # K and V shrink


@pytest.mark.parametrize("pattern", [["dense"], ["dense", "mod"], ["dense", "mode"]])
@pytest.mark.parametrize("n_kv_heads", [1, 2])
def test_grouped_query_attention_agrees_with_torch_flop_counter(
    pattern: list[str], n_kv_heads: int
) -> None:
    cfg = dataclasses.replace(_cfg(pattern), n_kv_heads=n_kv_heads)
    B = 2
    torch.manual_seed(0)
    model = TransformerLM(cfg).eval()
    assert model.layers[0].attn.n_kv_heads == n_kv_heads
    tokens = torch.randint(0, cfg.vocab_size, (B, cfg.max_seq_len))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(tokens)
    counted = fc.get_total_flops() / (B * cfg.max_seq_len)
    assert forward_flops(cfg, batch=B).per_token == pytest.approx(counted, rel=COUNT_REL)
    mha = forward_flops(dataclasses.replace(cfg, n_kv_heads=0), batch=B).per_token
    assert forward_flops(cfg, batch=B).per_token < mha


def _depth_cfg(pattern: list[str], exits: list[int]) -> ModelConfig:
    cfg = dataclasses.replace(_cfg(pattern), n_layers=len(pattern))
    return dataclasses.replace(
        cfg,
        exit=ExitConfig(layers=exits),
        ponder=PonderConfig(max_steps=3),
    )


@pytest.mark.parametrize(
    "pattern,exits",
    [
        (["dense", "dense", "mod"], [1, 2]),
        (["dense", "moe", "dense"], [2]),
        (["dense", "ponder"], []),
        (["ponder", "dense", "mod"], []),
        (["dense", "ponder", "moe"], []),
    ],
)
def test_exit_and_ponder_full_depth_agree_with_torch_flop_counter(
    pattern: list[str], exits: list[int]
) -> None:
    cfg = _depth_cfg(pattern, exits)
    validate_model(cfg)
    B = 2
    counted, model = _counted_flops_per_token(cfg, B)
    assert forward_flops(cfg, batch=B).per_token == pytest.approx(counted, rel=COUNT_REL)
    assert count_params(cfg).total == sum(p.numel() for p in model.parameters())


def test_expected_flops_of_a_depth_distribution() -> None:
    cfg = _depth_cfg(["dense"] * 4, [1, 2])
    full = forward_flops(cfg)
    D, V, L = 32, 64, 4
    block = full.blocks[0].total
    # Every token to full depth: all blocks, both exit heads and the final head.
    assert expected_flops(cfg, {L: 1.0}) == pytest.approx(full.per_token)
    # Exit after block 1: one block, K/V projections of three, one head.
    at_one = block + 3 * 2 * D * 2 * D + 2 * D * V
    assert expected_flops(cfg, {1: 5}) == pytest.approx(at_one)
    assert expected_flops(cfg, {1: 1, L: 1}) == pytest.approx((at_one + full.per_token) / 2)
    ponder = _depth_cfg(["dense", "ponder"], [])
    static = forward_flops(ponder)
    # Three steps is the static count without the head copies of steps 1 and 2.
    assert expected_flops(ponder, {4: 1.0}) == pytest.approx(static.per_token - 2 * 2 * D * V)
    one_step = expected_flops(ponder, {2: 1.0})
    assert one_step == pytest.approx(2 * static.blocks[0].total + 2 * D + 2 * D * V)
