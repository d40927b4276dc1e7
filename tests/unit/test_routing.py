"""The reference routing math (models/routing.py) on hand-made cases.

Expected values are worked out by hand in each test (never by calling the function
under test a second time). Shape suffixes as in routing.py: T tokens, E experts, K top-k.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.margins import assert_clear, topk_gap
from turnout.config.model import MoEConfig
from turnout.models import routing as R
from turnout.models.moe import MoELayer

pytestmark = pytest.mark.unit


def _logits_for(choices_TK: list[list[int]], num_experts: int) -> torch.Tensor:
    """Logits whose top-k (largest first) are exactly ``choices_TK`` (3, 2, 1, ... then 0)."""
    logits_TE = torch.zeros(len(choices_TK), num_experts)
    for t, row in enumerate(choices_TK):
        for rank, e in enumerate(row):
            logits_TE[t, e] = float(len(row) + 1 - rank)
    return logits_TE


# ---------------------------------------------------------------- capacity formula


@pytest.mark.parametrize(
    ("T", "E", "k", "cf", "min_cap", "expected"),
    [
        (16, 4, 2, 1.25, 4, 10),  # 1.25 * 16 * 2 / 4 = 10 exactly
        (10, 4, 1, 1.0, 0, 3),  # 2.5 -> ceil 3
        (8, 8, 1, 1.0, 4, 4),  # raw 1, min_capacity wins
        (8, 8, 1, 1.0, 0, 1),  # min_capacity 0: raw 1
        (50, 2, 2, 1.1, 0, 55),  # 1.1 * 50 * 2 / 2 = 55.00000000000001 in floats: still 55
        (7, 3, 2, 2.0, 1, 10),  # 2 * 7 * 2 / 3 = 9.33 -> 10
    ],
)
def test_capacity_formula(T: int, E: int, k: int, cf: float, min_cap: int, expected: int) -> None:
    assert R.expert_capacity(T, E, k, cf, min_cap) == expected


def test_capacity_float_noise_case_is_real() -> None:
    # The case the epsilon exists for: a naive ceil would add a bucket row.
    assert 1.1 * 50 * 2 / 2 > 55.0
    assert math.ceil(1.1 * 50 * 2 / 2) == 56
    assert R.expert_capacity(50, 2, 2, 1.1, 0) == 55


def test_capacity_dropless_is_none() -> None:
    assert R.expert_capacity(100, 4, 2, None, 4) is None


# ---------------------------------------------------------------- tie rule / top-k


def test_topk_ties_lower_index_wins() -> None:
    logits_TE = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 2.0, 2.0], [5.0, 1.0, 5.0, 5.0]])
    plan = R.moe_plan(logits_TE, top_k=2, capacity=None, normalize_gates=True)
    assert plan.expert_TK.tolist() == [[0, 1], [1, 2], [0, 2]]
    _, idx = R.topk_stable(torch.zeros(1, 40), 5)
    assert idx.tolist() == [[0, 1, 2, 3, 4]]


# ---------------------------------------------------------------- GShard priority

# T=4 tokens, E=3 experts, k=2. First choices: t0->0, t1->1, t2->0, t3->0.
# Second choices: t0->1, t1->0, t2->2, t3->1.
CHOICES = [[0, 1], [1, 0], [0, 2], [0, 1]]
# Expert 0 bucket in GShard order: t0(1st), t2(1st), t3(1st), then t1(2nd) -> slots 0,1,2,3.
# Expert 1: t1(1st) slot 0, then t0(2nd) slot 1, t3(2nd) slot 2. Expert 2: t2(2nd) slot 0.
SLOTS = [[0, 1], [0, 3], [1, 0], [2, 2]]
COUNTS = [4, 3, 1]


def test_gshard_slots_hand_made() -> None:
    plan = R.moe_plan(_logits_for(CHOICES, 3), top_k=2, capacity=None, normalize_gates=True)
    assert plan.expert_TK.tolist() == CHOICES
    assert plan.slot_TK.tolist() == SLOTS
    assert plan.counts_E.tolist() == COUNTS
    # Token-major order would have given t1's second choice slot 1 in expert 0: not GShard.
    assert plan.slot_TK[1, 1].item() == 3


@pytest.mark.parametrize(
    ("capacity", "keep"),
    [
        # C=3: only t1's second choice (slot 3 of expert 0) drops, although t1 < t3:
        # t3's FIRST choice outranks every second choice.
        (3, [[True, True], [True, False], [True, True], [True, True]]),
        # C=2: expert 0 keeps t0, t2; expert 1 keeps t1, t0(2nd); t3 loses both choices.
        (2, [[True, True], [True, False], [True, True], [False, False]]),
        (1, [[True, False], [True, False], [False, True], [False, False]]),
    ],
)
def test_which_assignments_drop(capacity: int, keep: list[list[bool]]) -> None:
    plan = R.moe_plan(_logits_for(CHOICES, 3), top_k=2, capacity=capacity, normalize_gates=True)
    assert plan.keep_TK.tolist() == keep
    n_dropped = sum(not k for row in keep for k in row)
    assert plan.dropped_fraction().item() == pytest.approx(n_dropped / 8)
    # Counts are taken before dropping, whatever the capacity.
    assert plan.counts_E.tolist() == COUNTS
    assert plan.capacity == capacity


def test_permute_places_tokens_in_their_slots() -> None:
    plan = R.moe_plan(_logits_for(CHOICES, 3), top_k=2, capacity=3, normalize_gates=True)
    x_TD = torch.arange(1.0, 5.0).unsqueeze(1).repeat(1, 2)  # token t has value t+1
    buckets_ECD = R.permute(x_TD, plan)
    assert buckets_ECD.shape == (3, 3, 2)
    # expert 0: t0, t2, t3 (t1's second choice dropped); expert 1: t1, t0, t3; expert 2: t2.
    assert buckets_ECD[..., 0].tolist() == [[1, 3, 4], [2, 1, 4], [3, 0, 0]]


def test_dropped_gate_is_not_redistributed() -> None:
    logits_TE = _logits_for(CHOICES, 3)
    plan = R.moe_plan(logits_TE, top_k=2, capacity=3, normalize_gates=True)
    # Expert e outputs the constant row (e+1) * 10 in every slot.
    y_ECD = torch.tensor([10.0, 20.0, 30.0]).view(3, 1, 1).expand(3, 3, 1).contiguous()
    out_T = R.combine(y_ECD, plan)[:, 0]
    # Hand computation: logits (3, 2, 0) -> probs p1 = e^3/(e^3+e^2+1), p2 = e^2/(...);
    # renormalised gates g1 = e^3/(e^3+e^2), g2 = e^2/(e^3+e^2).
    g1 = math.exp(3) / (math.exp(3) + math.exp(2))
    g2 = 1.0 - g1
    expected = [
        g1 * 10 + g2 * 20,  # t0: experts 0, 1
        g1 * 20,  # t1: expert 1 kept, its second choice (expert 0) dropped: NOT 1.0 * 20
        g1 * 10 + g2 * 30,  # t2: experts 0, 2
        g1 * 10 + g2 * 20,  # t3
    ]
    # fp32 gates (a softmax and a renormalisation: a few ulps) vs float64 by hand.
    assert out_T.tolist() == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------- gate normalisation


def _probs(logits: list[float]) -> list[float]:
    z = sum(math.exp(v) for v in logits)
    return [math.exp(v) / z for v in logits]


def test_gates_k2_default_renormalised() -> None:
    cfg = MoEConfig(num_experts=4, top_k=2)
    assert cfg.gates_normalized() is True
    row = [2.0, 0.5, 1.0, -1.0]
    plan = R.moe_plan(torch.tensor([row]), 2, None, cfg.gates_normalized())
    p = _probs(row)
    assert plan.expert_TK.tolist() == [[0, 2]]
    # fp32 softmax and renormalisation (a few ulps) vs float64 by hand.
    assert plan.gate_TK[0].tolist() == pytest.approx(
        [p[0] / (p[0] + p[2]), p[2] / (p[0] + p[2])], rel=1e-6
    )


def test_gates_k1_default_not_renormalised() -> None:
    cfg = MoEConfig(num_experts=4, top_k=1)
    assert cfg.gates_normalized() is False
    row = [2.0, 0.5, 1.0, -1.0]
    plan = R.moe_plan(torch.tensor([row]), 1, None, cfg.gates_normalized())
    # fp32 softmax (a few ulps) vs float64 by hand.
    assert plan.gate_TK[0].tolist() == pytest.approx([_probs(row)[0]], rel=1e-6)


def test_gates_explicit_override() -> None:
    row = [2.0, 0.5, 1.0, -1.0]
    p = _probs(row)
    k1 = MoEConfig(num_experts=4, top_k=1, normalize_gates=True)
    assert k1.gates_normalized() is True
    plan = R.moe_plan(torch.tensor([row]), 1, None, k1.gates_normalized())
    assert plan.gate_TK[0].tolist() == pytest.approx([1.0])
    k2 = MoEConfig(num_experts=4, top_k=2, normalize_gates=False)
    assert k2.gates_normalized() is False
    plan = R.moe_plan(torch.tensor([row]), 2, None, k2.gates_normalized())
    assert plan.gate_TK[0].tolist() == pytest.approx([p[0], p[2]], rel=1e-6)  # fp32 vs f64


# ---------------------------------------------------------------- dropless = per-expert loop


def _swiglu(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor) -> torch.Tensor:
    return (torch.nn.functional.silu(x @ wg) * (x @ wu)) @ wd


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_dropless_equals_per_expert_loop(top_k: int) -> None:
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=top_k, capacity_factor=None)
    layer = MoELayer(8, 12, cfg, init_std=0.3)
    x_TD = torch.randn(13, 8)
    y_TD, aux = layer(x_TD)
    # Plain loop: route each token by hand, run its experts one at a time.
    probs_TE = torch.softmax(x_TD @ layer.router_DE, dim=-1)
    bank = layer.experts
    expected = torch.zeros_like(x_TD)
    for t in range(13):
        order = sorted(range(4), key=lambda e: (-probs_TE[t, e].item(), e))[:top_k]
        gates = [probs_TE[t, e] for e in order]
        if cfg.gates_normalized():
            total = sum(gates)
            gates = [g / total for g in gates]
        for e, g in zip(order, gates, strict=True):
            w = (bank.w_gate_EDF[e], bank.w_up_EDF[e], bank.w_down_EFD[e])
            expected[t] += g * _swiglu(x_TD[t], *w)
    # The same router logits and gates; a grouped GEMM over each expert's rows vs one
    # matmul per token and expert sums in another order: ~4e-7 measured on outputs of
    # ~1.3, rtol 1e-5 leaves 30x.
    torch.testing.assert_close(y_TD, expected, rtol=1e-5, atol=1e-6)
    assert aux.dropped.item() == 0.0
    assert int(aux.counts_E.sum()) == 13 * top_k


def test_capacity_counts_are_before_dropping() -> None:
    torch.manual_seed(1)
    layer = MoELayer(8, 12, MoEConfig(num_experts=4, top_k=2, capacity_factor=0.25, min_capacity=0))
    x_TD = torch.randn(20, 8)
    _, aux = layer(x_TD)
    assert R.expert_capacity(20, 4, 2, 0.25, 0) == 3
    assert int(aux.counts_E.sum()) == 40  # every assignment counted, dropped or not
    assert aux.dropped.item() > 0.0
    logits_TE = x_TD @ layer.router_DE
    # torch.topk of the logits vs the layer's stable top-k of the probabilities: the same
    # experts only where no row's 2nd and 3rd logits (nearly) tie (5.7e-4 here).
    assert_clear(topk_gap(logits_TE, 2), "router top-2")
    expert_TK = torch.topk(logits_TE, 2, dim=-1).indices
    assert aux.counts_E.tolist() == torch.bincount(expert_TK.flatten(), minlength=4).tolist()


# ---------------------------------------------------------------- aux losses by hand


def test_load_balance_loss_hand_made_top1() -> None:
    # Two tokens, two experts, both choose expert 0: f = [1, 0]; P = [(0.75+0.9)/2, ...].
    probs_TE = torch.tensor([[0.75, 0.25], [0.9, 0.1]])
    expert_TK = torch.tensor([[0], [0]])
    assert R.load_balance_loss(probs_TE, expert_TK).item() == pytest.approx(2 * 0.825)


def test_load_balance_loss_hand_made_top2() -> None:
    # T=2, E=3, k=2: assignments {0,1} and {0,2}: f = [2/4, 1/4, 1/4].
    probs_TE = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.1, 0.3]])
    expert_TK = torch.tensor([[0, 1], [0, 2]])
    P = [0.55, 0.2, 0.25]
    f = [0.5, 0.25, 0.25]
    expected = 3 * sum(a * b for a, b in zip(f, P, strict=True))  # = 3 * 0.375 = 1.125
    assert R.load_balance_loss(probs_TE, expert_TK).item() == pytest.approx(expected)
    # Perfectly uniform routing and probs give exactly 1.
    uni = torch.full((3, 3), 1 / 3)
    assert R.load_balance_loss(uni, torch.tensor([[0], [1], [2]])).item() == pytest.approx(1.0)


def test_router_z_loss_hand_made() -> None:
    # logsumexp([0, 0]) = ln 2; logsumexp([ln 3, 0]) = ln 4 = 2 ln 2.
    logits_TE = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = (math.log(2) ** 2 + (2 * math.log(2)) ** 2) / 2
    # fp32 logsumexp and square (a few ulps) vs float64 by hand.
    assert R.router_z_loss(logits_TE).item() == pytest.approx(expected, rel=1e-6)


def test_aux_losses_are_finite_without_tokens() -> None:
    # A MoD block that chose no token (causal decode) hands the MoE zero rows.
    assert R.load_balance_loss(torch.zeros(0, 4), torch.zeros(0, 2, dtype=torch.long)).item() == 0
    assert R.router_z_loss(torch.zeros(0, 4)).item() == 0.0
    layer = MoELayer(8, 12, MoEConfig(num_experts=4, top_k=2, capacity_factor=None), num_noop=1)
    y_TD, aux = layer(torch.zeros(0, 8))
    assert y_TD.shape == (0, 8)
    for v in (aux.load_balance, aux.z_loss, aux.dropped, aux.noop_fraction):
        assert torch.isfinite(v).all()


def test_moe_layer_aux_matches_hand_formulas() -> None:
    torch.manual_seed(2)
    layer = MoELayer(6, 8, MoEConfig(num_experts=3, top_k=1, capacity_factor=None), init_std=0.5)
    x_TD = torch.randn(5, 6)
    _, aux = layer(x_TD)
    logits_TE = x_TD @ layer.router_DE
    probs_TE = torch.softmax(logits_TE, -1)
    top_T = probs_TE.argmax(-1)
    lb = 0.0
    for e in range(3):
        f_e = (top_T == e).float().mean().item()
        lb += f_e * probs_TE[:, e].mean().item()
    # fp32 in the layer vs Python floats over 5 tokens: a few ulps; 1e-5 is ample.
    assert aux.load_balance.item() == pytest.approx(3 * lb, rel=1e-5)
    z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits_TE.tolist()) / 5
    assert aux.z_loss.item() == pytest.approx(z, rel=1e-5)
    # Both are differentiable w.r.t. the router.
    (aux.load_balance + aux.z_loss).backward()
    assert layer.router_DE.grad is not None and layer.router_DE.grad.abs().sum() > 0
