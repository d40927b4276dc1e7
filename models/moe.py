"""Token-choice top-k Mixture-of-Experts FFN with an fp32 router.

Shape legend: T tokens, D width, E router columns (real + no-op experts), K top-k.
The layer computes a routing plan and hands it to ``self.dispatcher``; aux losses and
counters come back as return values (``MoEAux``), never as module state. A caller that
already has the router logits (and maybe the plan) of these tokens passes them as
:class:`Routed`: a 'mode' block whose router reads the block input does that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from turnout.config.model import ModelConfig, MoEConfig
from turnout.models import ops
from turnout.models.dispatch import Dispatcher, LocalDispatcher
from turnout.models.experts import ExpertBank
from turnout.models.routing import (
    RoutingPlan,
    expert_capacity,
    load_balance_loss,
    router_z_loss,
)


@dataclass
class MoEAux:
    """What one MoE layer returns besides its output (all from this rank's tokens)."""

    load_balance: torch.Tensor
    """E * sum_e f_e * P_e (differentiable, unweighted)."""
    z_loss: torch.Tensor
    """mean(logsumexp(logits)^2) (differentiable, unweighted)."""
    counts_E: torch.Tensor
    """Assignments per real expert before dropping (long, detached)."""
    dropped: torch.Tensor
    """Fraction of real-expert assignments dropped for capacity (detached)."""
    noop_fraction: torch.Tensor
    """Fraction of assignments to no-op experts (integrated MoDE; 0 otherwise)."""


@dataclass
class Routed:
    """Routing computed outside the layer for the tokens it is given (row t = token t)."""

    logits_TE: torch.Tensor
    """fp32 router logits of these tokens (the aux losses use them)."""
    plan: RoutingPlan | None = None
    """The plan from those logits; None: the layer plans from ``logits_TE`` itself."""


class MoELayer(nn.Module):
    def __init__(
        self,
        d_model: int,
        hidden: int,
        cfg: MoEConfig,
        init_std: float = ModelConfig.init_std,  # the config's default, defined there
        num_noop: int = 0,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.num_noop = num_noop
        self.top_k = cfg.top_k
        # The router matmul always runs in fp32 (see router_logits); under a bf16 engine the
        # stored copy is bf16 while the optimizer keeps the fp32 master.
        self.router_DE = nn.Parameter(torch.empty(d_model, cfg.num_experts + num_noop))
        nn.init.normal_(self.router_DE, std=init_std)
        self.experts = ExpertBank(cfg.num_experts, d_model, hidden, init_std)
        self.dispatcher: Dispatcher = LocalDispatcher()

    def router_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        return x_TD.float() @ self.router_DE.float()

    def capacity(self, num_tokens: int) -> int | None:
        """Per-expert capacity C for ``num_tokens`` tokens (None: dropless)."""
        return expert_capacity(
            num_tokens,
            self.num_experts,
            self.top_k,
            self.cfg.capacity_factor,
            self.cfg.min_capacity,
        )

    def forward(
        self, x_TD: torch.Tensor, routed: Routed | None = None
    ) -> tuple[torch.Tensor, MoEAux]:
        T = x_TD.shape[0]
        if routed is None:
            routed = Routed(self.router_logits(x_TD))
        logits_TE, plan = routed.logits_TE, routed.plan
        if logits_TE.shape[0] != T:
            raise ValueError(f"routed logits have {logits_TE.shape[0]} rows for {T} tokens")
        if plan is None:
            plan = ops.moe_plan(
                logits_TE,
                self.top_k,
                self.capacity(T),
                self.cfg.gates_normalized(),
                self.num_experts,
            )
        y_TD = self.dispatcher(x_TD, plan, self.experts)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        noop = (
            (plan.expert_TK >= self.num_experts).float().sum() / max(plan.expert_TK.numel(), 1)
            if self.num_noop
            else probs_TE.new_zeros(())
        )
        aux = MoEAux(
            load_balance=load_balance_loss(probs_TE, plan.expert_TK),
            z_loss=router_z_loss(logits_TE),
            counts_E=plan.counts_E.detach(),
            dropped=plan.dropped_fraction().detach(),
            noop_fraction=noop.detach(),
        )
        return y_TD, aux


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every MoE layer of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]
