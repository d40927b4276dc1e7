"""Grouped expert GEMMs and the expert-major order == the padded-bucket reference.

The bank's forward (torch's grouped GEMM where it runs) must equal its segment-loop
oracle ``grouped_reference`` and the bucketed ``buckets_reference``, outputs and
gradients, including experts with no rows; ``expert_major`` + ``combine_rows`` must
reproduce ``permute`` -> experts -> ``combine`` in capacity and dropless mode.
(tests/unit/test_expert_path.py compares whole layers, gradients included.)
"""

from __future__ import annotations

import pytest
import torch

from turnout.models import routing
from turnout.models.dispatch import combine_rows, expert_major
from turnout.models.experts import ExpertBank, buckets_reference, grouped_reference

D, F = 8, 16


def _grads(fn, bank: ExpertBank, x: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
    bank.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y = fn(x)
    y.backward(g)
    return [y.detach(), x.grad] + [p.grad.clone() for p in bank.parameters()]


@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 0, 0], [0, 7, 0, 0], [4, 4, 4, 4]])
def test_grouped_equals_loop_and_buckets(counts: list[int]) -> None:
    torch.manual_seed(0)
    bank = ExpertBank(4, D, F, init_std=0.3)
    x = torch.randn(sum(counts), D)
    g = torch.randn(sum(counts), D)
    got = _grads(lambda t: bank(t, counts), bank, x, g)
    ref = _grads(lambda t: grouped_reference(bank, t, counts), bank, x, g)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b)
    # Counts as a tensor (what the dispatchers pass) take the same path.
    for a, b in zip(_grads(lambda t: bank(t, torch.tensor(counts)), bank, x, g), got, strict=True):
        assert torch.equal(a, b)
    # Bucketed bmm with zero padding to C = max(counts) gives the same rows.
    C = max(max(counts), 1)

    def bucketed(t: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(t, counts)
        buckets = torch.stack([torch.cat([p, p.new_zeros(C - len(p), D)]) for p in pieces])
        y = buckets_reference(bank, buckets)
        return torch.cat([y[e, :n] for e, n in enumerate(counts)])

    for a, b in zip(got, _grads(bucketed, bank, x, g), strict=True):
        torch.testing.assert_close(a, b)
    assert all(p.grad is not None for p in bank.parameters())  # idle experts stay in the graph


def test_grouped_rejects_wrong_count_list() -> None:
    bank = ExpertBank(4, D, F, init_std=0.3)
    with pytest.raises(ValueError, match="3 row counts for 4 local experts"):
        bank(torch.randn(3, D), [1, 1, 1])
    with pytest.raises(ValueError, match="3 row counts for 4 local experts"):
        bank(torch.randn(3, D), torch.ones(3, dtype=torch.long))


@pytest.mark.parametrize("capacity", [None, 2, 5])
def test_expert_major_combine_equals_permute_combine(capacity: int | None) -> None:
    torch.manual_seed(1)
    T, E, K = 13, 4, 2
    bank = ExpertBank(E, D, F, init_std=0.3)
    x = torch.randn(T, D)
    logits = torch.randn(T, E + 1)  # one no-op column: never dispatched
    plan = routing.moe_plan(logits, K, capacity, True, num_experts=E)
    want = routing.combine(buckets_reference(bank, routing.permute(x, plan)), plan)
    order = expert_major(plan)
    assert int(order.counts_E.sum()) == int(plan.keep_TK.sum())
    if capacity is not None:
        assert torch.equal(order.counts_E, plan.counts_E.clamp(max=capacity))
        assert bool((plan.counts_E > capacity).any())  # drops really happen
    rows = bank(x.index_select(0, order.token_N), order.counts_E)
    torch.testing.assert_close(combine_rows(rows, order, T), want)


def test_widths_the_grouped_gemm_refuses_take_the_loop() -> None:
    # torch._grouped_mm wants row strides of 16 bytes: fp32 widths 6 and 10 are not.
    torch.manual_seed(2)
    bank = ExpertBank(3, 6, 10, init_std=0.3)
    counts = [2, 0, 3]
    x = torch.randn(5, 6)
    assert torch.equal(bank(x, counts), grouped_reference(bank, x, counts))
