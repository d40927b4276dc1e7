"""Token-choice top-k Mixture-of-Experts FFN with an fp32 router.

Shape legend: T tokens, D width, E router columns (real + no-op experts), K top-k.
The layer computes a routing plan and hands it to ``self.dispatcher``; aux losses and
counters come back as return values (``MoEAux``), never as module state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from turnout.config.model import MoEConfig
from turnout.models import ops
from turnout.models.dispatch import Dispatcher, LocalDispatcher
from turnout.models.experts import ExpertBank
from turnout.models.routing import expert_capacity, load_balance_loss, router_z_loss


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


class MoELayer(nn.Module):
    def __init__(
        self, d_model: int, hidden: int, cfg: MoEConfig, init_std: float = 0.02, num_noop: int = 0
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

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
        T = x_TD.shape[0]
        logits_TE = self.router_logits(x_TD)
        capacity = expert_capacity(
            T, self.num_experts, self.top_k, self.cfg.capacity_factor, self.cfg.min_capacity
        )
        plan = ops.moe_plan(
            logits_TE, self.top_k, capacity, self.cfg.gates_normalized(), self.num_experts
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
