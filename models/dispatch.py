"""The one expert path, between a routing plan and the experts that execute it.

A MoE layer computes a :class:`~turnout.models.routing.RoutingPlan` and hands the
tokens to its dispatcher. Every dispatcher runs :func:`run_experts`: the plan's kept
assignments sorted expert-major (:func:`expert_major`), their token rows gathered, the
rows through an :class:`Exchange` that runs them on their experts wherever those live,
and the gate-weighted rows summed back into tokens (:func:`combine_rows`). Only kept rows
are gathered, moved and multiplied: capacity mode differs from dropless only in which
assignments the plan keeps. :class:`LocalDispatcher` is the exchange where every expert
is on this process (training at ``ep_size = 1`` and every decode step);
``turnout.parallel`` installs an all-to-all dispatcher whose exchange sends the rows to
the ranks of their experts and back.

The bucket path (``ops.permute`` -> ``experts.buckets_reference`` -> ``ops.combine``)
computes the same outputs on zero-padded ``[E, C, D]`` buckets; it is the tests' oracle.

Shape legend: T tokens, K top-k, D width, E experts (global), N kept assignments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from turnout.models.experts import ExpertBank
from turnout.models.routing import RoutingPlan


class Dispatcher(Protocol):
    def __call__(self, x_TD: torch.Tensor, plan: RoutingPlan, experts: ExpertBank) -> torch.Tensor:
        """Send the plan's kept assignments to their experts; return the weighted combine."""
        ...


class Exchange(Protocol):
    def __call__(
        self, rows_ND: torch.Tensor, counts_E: torch.Tensor, experts: ExpertBank
    ) -> torch.Tensor:
        """Run expert-major rows on their experts (``counts_E[e]`` consecutive rows for
        global expert e, wherever it lives); return the outputs in the same order."""
        ...


@dataclass
class ExpertMajor:
    """The kept assignments of a plan, sorted by expert, then by slot (GShard order).

    Row n of the sorted order is the plan's assignment ``assignment_N[n]`` (flat index
    ``t * K + k``) of token ``token_N[n]``, weighted by ``gate_N[n]`` in the combine;
    expert e owns ``counts_E[e]`` consecutive rows. No padding: capacity mode differs
    from dropless only in which assignments are kept.
    """

    assignment_N: torch.Tensor
    token_N: torch.Tensor
    gate_N: torch.Tensor
    counts_E: torch.Tensor
    top_k: int


def expert_major(plan: RoutingPlan) -> ExpertMajor:
    """Sort the plan's kept assignments expert-major without a sort.

    The kept slots of expert e are exactly ``0 .. kept_e - 1`` (slots count in GShard
    order and capacity keeps a prefix), so ``kept_e = min(count_e, C)`` (dropless:
    ``count_e``) and ``offset_e + slot`` is each assignment's row. The only host sync is
    the number of kept assignments (the ``nonzero``); dropless needs no capacity.
    """
    K = plan.expert_TK.shape[1]
    flat_N = plan.keep_TK.reshape(-1).nonzero().squeeze(1)  # kept, in t * K + k order
    expert_N = plan.expert_TK.reshape(-1).index_select(0, flat_N)
    counts_E = plan.counts_E if plan.capacity is None else plan.counts_E.clamp(max=plan.capacity)
    offset_E = torch.cumsum(counts_E, 0) - counts_E
    row_N = offset_E.index_select(0, expert_N) + plan.slot_TK.reshape(-1).index_select(0, flat_N)
    sorted_N = torch.empty_like(flat_N).index_copy_(0, row_N, flat_N)
    gate_N = plan.gate_TK.reshape(-1).index_select(0, sorted_N)
    return ExpertMajor(sorted_N, sorted_N // K, gate_N, counts_E, K)


def combine_rows(y_ND: torch.Tensor, order: ExpertMajor, num_tokens: int) -> torch.Tensor:
    """Gate-weighted sum of expert-major output rows back into tokens: ``[T, D]``.

    Each weighted row goes to its own assignment's place in a ``[T, K, D]`` buffer (no
    two rows share one; dropped and no-op places stay zero), then the K places of a token
    are summed: the same result on every run and device at any K (an ``index_add`` of
    rows that share a token would accumulate in the order of the device's atomics), and
    a low-precision sum accumulates in fp32 and rounds once. A dropped assignment's gate
    is not given to the token's other choices.
    """
    K, D = order.top_k, y_ND.shape[1]
    weighted_ND = y_ND * order.gate_N.unsqueeze(1).to(y_ND.dtype)
    placed = y_ND.new_zeros(num_tokens * K, D).index_copy(0, order.assignment_N, weighted_ND)
    return placed.view(num_tokens, K, D).sum(1)


def run_experts(
    x_TD: torch.Tensor, plan: RoutingPlan, experts: ExpertBank, exchange: Exchange
) -> torch.Tensor:
    """The layer's expert output for these tokens, every layout: kept rows only, sorted
    expert-major, through ``exchange``, combined: ``[T, D]`` in ``x_TD``'s dtype."""
    order = expert_major(plan)
    rows_ND = x_TD.index_select(0, order.token_N)
    y_ND = exchange(rows_ND, order.counts_E, experts)
    return combine_rows(y_ND, order, x_TD.shape[0]).to(x_TD.dtype)


def _here(rows_ND: torch.Tensor, counts_E: torch.Tensor, experts: ExpertBank) -> torch.Tensor:
    """Every expert is on this process: one grouped GEMM per weight, nothing travels."""
    return experts(rows_ND, counts_E)


class LocalDispatcher:
    """All experts live here: :func:`run_experts` with nothing to exchange."""

    def __call__(self, x_TD: torch.Tensor, plan: RoutingPlan, experts: ExpertBank) -> torch.Tensor:
        if experts.num_local != plan.num_experts:
            raise RuntimeError(
                f"LocalDispatcher needs all {plan.num_experts} experts, "
                f"the bank holds {experts.num_local}"
            )
        return run_experts(x_TD, plan, experts, _here)

    def __repr__(self) -> str:
        return "LocalDispatcher()"
