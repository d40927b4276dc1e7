"""The dispatcher seam between a routing plan and the experts that execute it.

A MoE layer computes a :class:`~turnout.models.routing.RoutingPlan` and hands the
tokens to its dispatcher. :class:`LocalDispatcher` runs every expert on this process;
``turnout.parallel`` installs an all-to-all dispatcher with the same interface.

Shape legend: T tokens, D width, E experts, C capacity, N kept assignments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from turnout.models import ops
from turnout.models.experts import ExpertBank
from turnout.models.routing import RoutingPlan


class Dispatcher(Protocol):
    def __call__(self, x_TD: torch.Tensor, plan: RoutingPlan, experts: ExpertBank) -> torch.Tensor:
        """Send the plan's kept assignments to their experts; return the weighted combine."""
        ...


@dataclass
class ExpertMajor:
    """The kept assignments of a plan, sorted by expert, then by slot (GShard order).

    Row n of the sorted order comes from token ``token_N[n]`` and is weighted by
    ``gate_N[n]`` in the combine; expert e owns ``counts_E[e]`` consecutive rows. No
    padding: capacity mode differs from dropless only in which assignments are kept.
    """

    token_N: torch.Tensor
    gate_N: torch.Tensor
    counts_E: torch.Tensor


def expert_major(plan: RoutingPlan) -> ExpertMajor:
    """Sort the plan's kept assignments expert-major without a sort.

    The kept slots of expert e are exactly ``0 .. kept_e - 1`` (slots count in GShard
    order and capacity keeps a prefix), so ``offset_e + slot`` is each assignment's row.
    """
    T, K = plan.expert_TK.shape
    keep_TK = plan.keep_TK
    expert_N = plan.expert_TK[keep_TK]
    kept_E = torch.bincount(expert_N, minlength=plan.num_experts)
    row_N = (torch.cumsum(kept_E, 0) - kept_E)[expert_N] + plan.slot_TK[keep_TK]
    # Flat assignment index t * K + k of each kept assignment, placed at its row.
    flat_N = torch.arange(T * K, device=keep_TK.device).view(T, K)[keep_TK]
    sorted_N = torch.empty_like(flat_N).index_copy_(0, row_N, flat_N)
    return ExpertMajor(sorted_N // K, plan.gate_TK.reshape(-1)[sorted_N], kept_E)


def combine_rows(y_ND: torch.Tensor, order: ExpertMajor, num_tokens: int) -> torch.Tensor:
    """Gate-weighted sum of expert-major output rows back into tokens: ``[T, D]``."""
    weighted_ND = y_ND * order.gate_N.unsqueeze(1).to(y_ND.dtype)
    return y_ND.new_zeros(num_tokens, y_ND.shape[1]).index_add(0, order.token_N, weighted_ND)


class LocalDispatcher:
    """All experts live here: permute into ``[E, C, D]``, batched GEMMs, combine."""

    def __call__(self, x_TD: torch.Tensor, plan: RoutingPlan, experts: ExpertBank) -> torch.Tensor:
        if experts.num_local != plan.num_experts:
            raise RuntimeError(
                f"LocalDispatcher needs all {plan.num_experts} experts, "
                f"the bank holds {experts.num_local}"
            )
        buckets_ECD = ops.permute(x_TD, plan)
        y_ECD = experts(buckets_ECD)
        return ops.combine(y_ECD, plan).to(x_TD.dtype)

    def __repr__(self) -> str:
        return "LocalDispatcher()"
