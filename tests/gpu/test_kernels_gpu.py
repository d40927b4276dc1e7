"""The CUDA routing kernels against the reference on the same CUDA tensors (marker gpu)."""

from __future__ import annotations

import pytest
import torch

from turnout.models import kernels, ops
from turnout.models import routing as ref
from turnout.models.routing import expert_capacity, mod_capacity

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True, scope="module")
def _built() -> None:
    assert kernels.load() and kernels.supports(torch.empty(0, device=CUDA)), "no CUDA kernels"


def assert_same_plan(a, b) -> None:
    for name in ("expert_TK", "slot_TK", "keep_TK", "counts_E"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.capacity == b.capacity
    torch.testing.assert_close(a.gate_TK, b.gate_TK, rtol=1e-6, atol=1e-7)


CASES = [
    (T, E, k, factor, noop, integer)
    for T in (1, 300, 70000)
    for E, k in ((8, 1), (8, 2), (64, 2), (256, 2), (6, 6))
    for factor in (None, 1.0)
    for noop in (0, 2)
    for integer in (True, False)
]


@pytest.mark.parametrize("T,E,k,factor,noop,integer", CASES)
def test_moe_plan_cuda_matches_reference(T, E, k, factor, noop, integer) -> None:
    g = torch.Generator().manual_seed(T * E + k)
    cols = E + noop
    if integer:
        logits = torch.randint(-2, 3, (T, cols), generator=g).float().to(CUDA)
    else:
        logits = torch.randn(T, cols, generator=g).to(CUDA)
    k = min(k, cols)
    cap = expert_capacity(T, E, k, factor, 4)
    assert_same_plan(ops.moe_plan(logits, k, cap, k > 1, E), ref.moe_plan(logits, k, cap, k > 1, E))


@pytest.mark.parametrize(
    "B,S,capacity", [(1, 1, 1.0), (3, 17, 0.5), (4, 2048, 0.125), (2, 5000, 1.0)]
)
@pytest.mark.parametrize("integer", [True, False])
def test_mod_select_and_mode_plan_cuda(B, S, capacity, integer) -> None:
    g = torch.Generator().manual_seed(B * S)
    scores = torch.randint(-2, 3, (B, S), generator=g).float() if integer else torch.randn(B, S)
    scores = scores.to(CUDA)
    m = mod_capacity(S, capacity)
    a, b = ops.mod_select(scores, m), ref.mod_select(scores, m)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    logits = torch.randint(-2, 3, (B * S, 9), generator=g).float().to(CUDA)
    cap = expert_capacity(B * m, 8, 2, 1.0, 1)
    idx, chosen, plan = ops.mode_plan(scores, m, logits, 2, cap, True, 8)
    rows = (b[0] + torch.arange(B, device=CUDA).unsqueeze(1) * S).reshape(-1)
    assert torch.equal(idx, b[0]) and torch.equal(chosen, b[1])
    assert_same_plan(plan, ref.moe_plan(logits[rows], 2, cap, True, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_permute_combine_cuda(dtype) -> None:
    logits = torch.randn(500, 8, device=CUDA)
    plan = ops.moe_plan(logits, 2, 100, True, 8)
    x = torch.randn(500, 64, device=CUDA).to(dtype)
    assert torch.equal(ops.permute(x, plan), ref.permute(x, plan))
    y = torch.randn(8, 100, 64, device=CUDA).to(dtype)
    tol = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(ops.combine(y, plan), ref.combine(y, plan), **tol)


def test_gradcheck_and_gate_grad_cuda() -> None:
    logits = torch.randn(12, 4, device=CUDA, requires_grad=True)
    plan = ops.moe_plan(logits, 2, 5, True, 4)
    w = torch.randn(12, 2, device=CUDA)
    (g1,) = torch.autograd.grad((plan.gate_TK * w).sum(), logits)
    (g2,) = torch.autograd.grad((ref.moe_plan(logits, 2, 5, True, 4).gate_TK * w).sum(), logits)
    torch.testing.assert_close(g1, g2)
    e, s, k = plan.expert_TK, plan.slot_TK, plan.keep_TK
    y = torch.randn(4, 5, 3, device=CUDA, dtype=torch.float64, requires_grad=True)
    x = torch.randn(12, 3, device=CUDA, dtype=torch.float64, requires_grad=True)
    gate = plan.gate_TK.detach().double().requires_grad_()
    t = torch.ops.turnout
    assert torch.autograd.gradcheck(lambda y, g: t.combine(y, e, s, k, g), (y, gate))
    assert torch.autograd.gradcheck(lambda x, g: t.permute(x, e, s, k, g, 4, 5), (x, gate))


def test_cuda_self_check_passes() -> None:
    from turnout.models.kernel_check import mismatches

    assert mismatches(CUDA) == []
