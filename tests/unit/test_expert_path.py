"""The experts' kept-rows path (models/dispatch.py) against the bucket path and GShard.

The layer's path (``expert_major`` -> the bank's grouped GEMM -> ``combine_rows``) must
give the outputs and the gradients (input, router, expert weights) of the bucket path
(``ops.permute`` -> ``buckets_reference`` -> ``ops.combine``, what ``LocalDispatcher``
ran before, kept as the oracle) on the same tokens: capacity mode with real drops and
dropless, with no-op experts (integrated MoDE) and with a selection bias. The rows it
computes must be exactly the assignments the GShard order keeps (an independent loop
here), in that order; a decode step runs k rows, not E.

Both paths of a comparison run the same routing code on the same inputs, so their plans
are bitwise equal (asserted): no routing decision can differ between them, and no data
point needs a margin from a tie. Only the expert GEMMs and the combine round differently.
"""

from __future__ import annotations

import pytest
import torch

from turnout.config.model import MoEConfig
from turnout.models import ops
from turnout.models.dispatch import Dispatcher, LocalDispatcher, expert_major
from turnout.models.experts import ExpertBank, buckets_reference
from turnout.models.moe import MoELayer
from turnout.models.routing import RoutingPlan

pytestmark = pytest.mark.unit

T, D, F, E, K = 40, 16, 24, 4, 2
PLAN_FIELDS = ("expert_TK", "gate_TK", "slot_TK", "keep_TK", "counts_E")


def bucket_path(x_TD: torch.Tensor, plan: RoutingPlan, experts: ExpertBank) -> torch.Tensor:
    """The old single-process path: zero-padded ``[E, C, D]`` buckets, bmm, combine."""
    return ops.combine(buckets_reference(experts, ops.permute(x_TD, plan)), plan).to(x_TD.dtype)


class Recording:
    """A dispatcher that records the plans it is given and delegates."""

    def __init__(self, inner: Dispatcher) -> None:
        self.inner = inner
        self.plans: list[RoutingPlan] = []

    def __call__(self, x_TD: torch.Tensor, plan: RoutingPlan, experts: ExpertBank) -> torch.Tensor:
        self.plans.append(plan)
        return self.inner(x_TD, plan, experts)


def _layer(capacity_factor: float | None, noop: int, bias: bool) -> MoELayer:
    torch.manual_seed(0)
    cfg = MoEConfig(
        num_experts=E,
        top_k=K,
        capacity_factor=capacity_factor,
        min_capacity=1,
        num_noop_experts=noop,
        balance="bias" if bias else "aux",
    )
    layer = MoELayer(D, F, cfg, init_std=0.3, num_noop=noop)
    if bias:
        assert layer.expert_bias is not None
        layer.expert_bias.copy_(torch.tensor([0.4, -0.3, 0.2, -0.3]))
    return layer


def _run(
    layer: MoELayer, dispatcher: Dispatcher, x_TD: torch.Tensor, g_TD: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor | None], RoutingPlan]:
    """Output, gradients (input, router, expert weights) and the plan of one fwd + bwd."""
    layer.zero_grad(set_to_none=True)
    layer.dispatcher = rec = Recording(dispatcher)
    x = x_TD.clone().requires_grad_(True)
    y, _ = layer(x)
    (y * g_TD).sum().backward()
    grads = {"x": x.grad, "router": layer.router_DE.grad}
    grads |= {n: p.grad for n, p in layer.experts.named_parameters()}
    return y.detach(), grads, rec.plans[0]


@pytest.mark.parametrize("bias", [False, True], ids=["aux", "bias"])
@pytest.mark.parametrize("noop", [0, 2], ids=["moe", "imode"])
@pytest.mark.parametrize("capacity_factor", [0.5, None], ids=["capacity", "dropless"])
def test_kept_rows_equal_bucket_path(capacity_factor: float | None, noop: int, bias: bool) -> None:
    layer = _layer(capacity_factor, noop, bias)
    gen = torch.Generator().manual_seed(1)
    x_TD, g_TD = torch.randn(T, D, generator=gen), torch.randn(T, D, generator=gen)
    y_new, g_new, plan = _run(layer, LocalDispatcher(), x_TD, g_TD)
    y_old, g_old, plan_old = _run(layer, bucket_path, x_TD, g_TD)
    for name in PLAN_FIELDS:
        assert torch.equal(getattr(plan, name), getattr(plan_old, name)), name
    real_TK = plan.expert_TK < E
    if capacity_factor is None:
        assert plan.capacity is None and torch.equal(plan.keep_TK, real_TK)
    else:
        assert int((real_TK & ~plan.keep_TK).sum()) > 0  # capacity really drops
    if noop:
        assert bool((~real_TK).any())  # some assignments go to a no-op expert
    assert y_new.abs().max() > 1e-2
    # fp32; the two paths differ only in how the expert GEMMs and the combine sum: a
    # grouped GEMM over each expert's kept rows against a bmm over zero-padded buckets
    # (other blockings of the same dot products of length D or F), then one sum over k
    # against the kernel's accumulation. Measured: at most 6e-6 on values up to ~40 (the
    # router gradient), 1-2 ulps; rtol 1e-5 leaves ~50x for another CPU's GEMM kernels.
    torch.testing.assert_close(y_new, y_old, rtol=1e-5, atol=1e-5)
    assert g_new.keys() == g_old.keys()
    for name in g_new:
        torch.testing.assert_close(g_new[name], g_old[name], rtol=1e-5, atol=1e-5, msg=name)


def _gshard_kept(plan: RoutingPlan) -> list[list[tuple[int, int]]]:
    """Per real expert, the (token, choice) pairs kept, in bucket order, by the rule of
    design §3.1 written as a loop: all first choices by token, then all second choices,
    ...; a real expert takes the first C it is given (dropless: all)."""
    expert_TK = plan.expert_TK.tolist()
    cap = plan.capacity
    kept: list[list[tuple[int, int]]] = [[] for _ in range(plan.num_experts)]
    for k in range(len(expert_TK[0]) if expert_TK else 0):
        for t, row in enumerate(expert_TK):
            e = row[k]
            if e < plan.num_experts and (cap is None or len(kept[e]) < cap):
                kept[e].append((t, k))
    return kept


@pytest.mark.parametrize("noop", [0, 2], ids=["moe", "imode"])
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, None])
def test_rows_are_the_gshard_kept_assignments(capacity_factor: float | None, noop: int) -> None:
    layer = _layer(capacity_factor, noop, bias=False)
    x_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plan = layer.plan(layer.router_logits(x_TD), layer.capacity(T))
    order = expert_major(plan)
    want = _gshard_kept(plan)
    assert order.counts_E.tolist() == [len(rows) for rows in want]
    got = [(a // K, a % K) for a in order.assignment_N.tolist()]
    assert got == [pair for rows in want for pair in rows]  # expert-major, GShard within
    assert order.token_N.tolist() == [t for t, _ in got]
    # The bucket oracle keeps the same assignments: each in its GShard slot.
    assert sorted(got) == sorted(map(tuple, plan.keep_TK.nonzero().tolist()))


def test_a_token_with_every_assignment_dropped_gets_zero() -> None:
    layer = _layer(0.25, 0, bias=False)
    x_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y_TD, _ = layer(x_TD)
        plan = layer.plan(layer.router_logits(x_TD), layer.capacity(T))
    lost_T = ~plan.keep_TK.any(1)
    assert bool(lost_T.any()) and bool((~lost_T).any())
    assert torch.equal(y_TD[lost_T], torch.zeros_like(y_TD[lost_T]))
    assert bool((y_TD[~lost_T].abs().sum(1) > 0).all())


@pytest.mark.parametrize("noop", [0, 2], ids=["moe", "imode"])
@pytest.mark.parametrize("tokens", [1, 3])
def test_decode_step_runs_kept_rows_only(tokens: int, noop: int) -> None:
    layer = _layer(1.25, noop, bias=True)  # decode is dropless whatever the factor says
    rows: list[int] = []
    layer.experts.register_forward_pre_hook(lambda _m, args: rows.append(args[0].shape[0]))
    x_TD = torch.randn(tokens, D, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits_TE = layer.router_logits(x_TD)
        y_TD = layer.dropless_local(x_TD, logits_TE)
        plan = layer.plan(logits_TE, None)
        want_TD = bucket_path(x_TD, plan, layer.experts)
    real = int((plan.expert_TK < E).sum())
    assert rows == [real] and real <= tokens * K  # k rows per token at most, never E
    # fp32, the bucket path's bmm over padded buckets vs the grouped GEMM (as above).
    torch.testing.assert_close(y_TD, want_TD, rtol=1e-5, atol=1e-5)
