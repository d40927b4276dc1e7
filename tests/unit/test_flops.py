"""FLOP accounting (models/flops.py) against hand counts and torch's FlopCounterMode."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from turnout.config.hyper import HyperConfig
from turnout.config.model import (
    ExitConfig,
    MoDConfig,
    ModelConfig,
    MoEConfig,
    PonderConfig,
    RecursionConfig,
    validate_model,
)
from turnout.models.dispatch import Dispatcher
from turnout.models.experts import ExpertBank
from turnout.models.flops import (
    SWIGLU_MATMULS,
    dense_counterpart,
    expected_flops,
    forward_flops,
    moe_rows,
)
from turnout.models.lm import TransformerLM
from turnout.models.moe import moe_layers
from turnout.models.params import count_params
from turnout.models.routing import RoutingPlan

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
        moe=MoEConfig(
            **{**dict(num_experts=4, top_k=2, capacity_factor=1.25, min_capacity=2), **moe}
        ),
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


def test_moe_counts_kept_rows_only() -> None:
    """The experts compute kept rows, no capacity padding, at every ep: the real rows
    under balanced routing, capped by the buckets."""
    cfg = _cfg(["moe"])
    B, S, D, E, k = 3, 24, 32, 4, 2
    T = B * S
    block = forward_flops(cfg, batch=B).blocks[0]
    assert block.ffn == pytest.approx(k * 3 * 2 * D * 64)  # T * k rows (< E * C = 180)
    assert block.routing == 2 * D * E
    tight = _cfg(["moe"], capacity_factor=0.5)
    C = -(-int(0.5 * T * k) // E)  # buckets smaller than the assignments: drops
    rows = forward_flops(tight, batch=B).blocks[0].ffn * T / (3 * 2 * D * 64)
    assert rows == pytest.approx(E * C)
    dropless = _cfg(["moe"], capacity_factor=None)
    assert forward_flops(dropless, batch=B).blocks[0].ffn == k * 3 * 2 * D * 64
    noop = _cfg(["imode"], num_noop_experts=2)  # k' = k * 4 / 6 rows per token
    assert forward_flops(noop, batch=B).blocks[0].ffn == pytest.approx(k * 4 / 6 * 3 * 2 * D * 64)


def test_routed_models_cost_less_than_their_dense_counterpart() -> None:
    for pattern in (["dense", "mod"], ["dense", "mode"]):
        cfg = _cfg(pattern)
        dense = forward_flops(dense_counterpart(cfg))
        assert forward_flops(cfg).fraction_of(dense) < 1.0


# FlopCounterMode counts what ran; the counter takes the experts' kept rows under
# balanced routing (models/flops.py), which a random-init router need not route: each
# comparison adds the difference between the rows the plans kept and that assumption
# (``Counted.routing_gap``, read from the plans; 0 in these cases except integrated MoDE,
# whose random router sends fewer assignments to its no-op experts than balanced: 3.8% of
# the FLOPs). Both sides are then integer FLOP counts of the same shapes, so no float
# rounding or routing decision enters: they agree exactly today. COUNT_REL (0.5%) only
# leaves room for an op another torch's FlopCounterMode counts.
COUNT_REL = 0.005


def _grouped_mm_flops(
    a_shape: tuple[int, ...], b_shape: tuple[int, ...], *args: object, **kwargs: object
) -> int:
    """FLOPs of ``torch._grouped_mm`` (FlopCounterMode has no formula for it): every row
    of a 2D ``[N, K]`` operand meets one group's ``[K, M]`` matrix, ``2 N K M``; the
    weight gradient (2D x 2D, groups along the contraction) ``2 K N M`` too."""
    if len(a_shape) == 2 and len(b_shape) == 3:
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    raise NotImplementedError(f"grouped_mm of {a_shape} x {b_shape}")


@dataclass
class Counted:
    per_token: float
    """FlopCounterMode's forward FLOPs per token."""
    routing_gap: float
    """Per token: the FLOPs of the expert rows the plans kept minus those of the rows the
    counter assumes for the same calls (balanced routing)."""
    model: TransformerLM


@contextmanager
def _kept_rows(model: TransformerLM, cfg: ModelConfig) -> Iterator[list[float]]:
    """Per MoE call: (rows kept - rows the counter assumes for its tokens) FLOPs."""
    gaps: list[float] = []
    row_flops = SWIGLU_MATMULS * 2 * cfg.d_model * cfg.expert_hidden()
    originals = [(layer, layer.dispatcher) for layer in moe_layers(model)]
    for layer, inner in originals:

        def recording(
            x: torch.Tensor,
            plan: RoutingPlan,
            experts: ExpertBank,
            inner: Dispatcher = inner,
            noop: int = layer.num_noop,
        ) -> torch.Tensor:
            kept = int(plan.keep_TK.sum())
            gaps.append((kept - moe_rows(cfg, plan.num_tokens, noop)) * row_flops)
            return inner(x, plan, experts)

        layer.dispatcher = recording
    try:
        yield gaps
    finally:
        for layer, inner in originals:
            layer.dispatcher = inner


def _counted_flops_per_token(cfg: ModelConfig, batch: int) -> Counted:
    """FlopCounterMode's forward FLOPs per token of a fresh model of ``cfg`` (one process)."""
    torch.manual_seed(0)
    model = TransformerLM(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.max_seq_len))
    grouped = {torch.ops.aten._grouped_mm: _grouped_mm_flops}
    # The math SDPA backend decomposes attention into counted bmm calls.
    with (
        torch.no_grad(),
        sdpa_kernel(SDPBackend.MATH),
        FlopCounterMode(display=False, custom_mapping=grouped) as fc,
        _kept_rows(model, cfg) as gaps,
    ):
        model(tokens)
    N = batch * cfg.max_seq_len
    return Counted(fc.get_total_flops() / N, sum(gaps) / N, model)


@pytest.mark.parametrize(
    "pattern,moe",
    [
        (["dense"], {}),
        (["dense", "mod"], {}),
        (["moe"], {}),
        (["moe"], {"capacity_factor": 0.5}),
        (["moe"], {"capacity_factor": None}),
        (["dense", "mode"], {}),
        (["dense", "mode"], {"router_input": "block"}),
        (["imode"], {"num_noop_experts": 2}),
        (["moe"], {"shared_experts": 2, "capacity_factor": None}),
        (["dense", "mode"], {"shared_experts": 1}),
        (["moe"], {"hyper": HyperConfig(enabled=True), "capacity_factor": None}),
        (["dense", "mode"], {"hyper": HyperConfig(enabled=True, rank=2, hidden=8)}),
    ],
)
@pytest.mark.parametrize("predictor", ["mlp", "router"])
def test_agrees_with_torch_flop_counter(pattern: list[str], moe: dict, predictor: str) -> None:
    cfg = _cfg(pattern, **moe)
    cfg.mod.predictor = predictor
    B = 3
    counted = _counted_flops_per_token(cfg, B)
    estimate = forward_flops(cfg, batch=B).per_token
    assert estimate + counted.routing_gap == pytest.approx(counted.per_token, rel=COUNT_REL)
    if cfg.moe.capacity_factor is None and "imode" not in pattern:
        # Dropless without no-op experts runs exactly k rows per token: no assumption.
        assert counted.routing_gap == 0


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
    counted = _counted_flops_per_token(cfg, B)
    assert counted.model.layers[0].attn.n_kv_heads == n_kv_heads
    estimate = forward_flops(cfg, batch=B).per_token
    assert estimate + counted.routing_gap == pytest.approx(counted.per_token, rel=COUNT_REL)
    mha = forward_flops(dataclasses.replace(cfg, n_kv_heads=0), batch=B).per_token
    assert forward_flops(cfg, batch=B).per_token < mha


@pytest.mark.parametrize("pattern", [["dense"], ["dense", "mode"]])
def test_wide_heads_and_qk_norm_agree_with_torch_flop_counter(pattern: list[str]) -> None:
    # Qwen3's shape: H * Hd (4 x 16 = 64) wider than D (32); the q/k norms are not matmuls.
    cfg = dataclasses.replace(_cfg(pattern), head_dim=16, qk_norm=True, n_kv_heads=2)
    B = 2
    counted = _counted_flops_per_token(cfg, B)
    estimate = forward_flops(cfg, batch=B).per_token
    assert estimate + counted.routing_gap == pytest.approx(counted.per_token, rel=COUNT_REL)
    narrow = forward_flops(dataclasses.replace(cfg, head_dim=0), batch=B).per_token
    assert estimate > narrow


def test_shared_experts_hand_count() -> None:
    # Dropless top-2 of 4 experts (width 64) plus 2 shared experts on every token: the
    # shared SwiGLU of width 2 * 64 costs as much as two more routed choices.
    routed = forward_flops(_cfg(["moe"], capacity_factor=None)).blocks[0]
    shared = forward_flops(_cfg(["moe"], capacity_factor=None, shared_experts=2)).blocks[0]
    assert shared.ffn == 2 * routed.ffn
    assert (shared.attention, shared.routing) == (routed.attention, routed.routing)


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
    counted = _counted_flops_per_token(cfg, B)
    estimate = forward_flops(cfg, batch=B).per_token
    assert estimate + counted.routing_gap == pytest.approx(counted.per_token, rel=COUNT_REL)
    assert count_params(cfg).total == sum(p.numel() for p in counted.model.parameters())


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


@pytest.mark.parametrize(
    "pattern,recursion",
    [
        (["dense", "recursion", "dense"], {}),
        (["dense", "recursion", "dense"], {"cache": "shared_first"}),
        (["recursion", "mod"], {"group": 2, "capacities": [0.5, 0.5, 0.25]}),
        (["dense", "recursion"], {"predictor": "router", "cache": "shared_first", "group": 2}),
        (["dense", "recursion", "dense"], {"routing": "token"}),
        (["dense", "recursion"], {"routing": "token", "cache": "shared_first", "group": 2}),
    ],
)
def test_recursion_agrees_with_torch_flop_counter_and_counts_shared_weights_once(
    pattern: list[str], recursion: dict
) -> None:
    cfg = dataclasses.replace(
        _cfg(pattern),
        n_layers=len(pattern),
        recursion=RecursionConfig(**{"max_recursions": 3, "predictor_hidden": 16, **recursion}),
    )
    validate_model(cfg)
    B = 2
    counted = _counted_flops_per_token(cfg, B)
    estimate = forward_flops(cfg, batch=B).per_token
    # No MoE layer in these models: routing_gap is 0 and the count is exact up to what
    # FlopCounterMode leaves out (COUNT_REL).
    assert estimate == pytest.approx(counted.per_token, rel=COUNT_REL)
    assert count_params(cfg).total == sum(p.numel() for p in counted.model.parameters())


def test_expected_flops_of_recursion_depths() -> None:
    cfg = dataclasses.replace(
        _cfg(["dense", "recursion"]), recursion=RecursionConfig(max_recursions=3, group=2)
    )
    D, V = 32, 64
    dense = forward_flops(dataclasses.replace(cfg, layer_pattern=["dense"]))
    block = dense.blocks[0].total  # one dense block at the full-sequence convention
    predictor = 2 * D * 64 + 2 * 64  # the default predictor_hidden
    # One recursion: the group's 2 blocks, then the routers of recursions 1 and 2 and the
    # predictor of recursion 2 (capacity 2/3) that stopped it.
    one = block + 2 * block + 2 * 2 * D + predictor + 2 * D * V
    assert expected_flops(cfg, {1 + 2: 1.0}) == pytest.approx(one)
    # All three: 6 block passes, 3 router columns and the predictors of recursions 2 and 3.
    three = block + 6 * block + 3 * 2 * D + 2 * predictor + 2 * D * V
    assert expected_flops(cfg, {1 + 6: 1.0}) == pytest.approx(three)
    assert expected_flops(cfg, {3: 1, 7: 3}) == pytest.approx((one + 3 * three) / 4)
