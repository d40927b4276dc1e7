"""The dispatcher seam between a routing plan and the experts that execute it.

A MoE layer computes a :class:`~turnout.models.routing.RoutingPlan` and hands the
tokens to its dispatcher. :class:`LocalDispatcher` runs every expert on this process;
``turnout.parallel`` installs an all-to-all dispatcher with the same interface.

Shape legend: T tokens, D width, E experts, C capacity.
"""

from __future__ import annotations

from typing import Protocol

import torch

from turnout.models import ops
from turnout.models.experts import ExpertBank
from turnout.models.routing import RoutingPlan


class Dispatcher(Protocol):
    def __call__(self, x_TD: torch.Tensor, plan: RoutingPlan, experts: ExpertBank) -> torch.Tensor:
        """Send the plan's kept assignments to their experts; return the weighted combine."""
        ...


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
