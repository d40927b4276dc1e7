"""Token-choice top-k Mixture-of-Experts FFN with an fp32 router.

Shape legend: T tokens, D width, E router columns (real + no-op experts), K top-k,
R real experts (``num_experts``).
The layer computes a routing plan and hands it to ``self.dispatcher``; aux losses and
counters come back as return values (``MoEAux``), never as module state. Shared experts
(``model.moe.shared_experts``) run on every token the layer is given and add to the
routed output. A caller that
already has the router logits (and maybe the plan) of these tokens passes them as
:class:`Routed`: a 'mode' block whose router reads the block input does that.

Aux-loss-free balancing (``model.moe.balance: bias | both``): the layer holds a
persistent fp32 buffer ``expert_bias`` (one value per real expert, replicated on every
rank) that :func:`routing.moe_plan` adds to the logits for the top-k choice only; the
gates stay the unbiased probabilities. No-op columns (integrated MoDE) get no bias: how
many tokens skip the FFN is a compute/quality trade-off the router learns, not a load
to even out, and a bias there would change the layer's compute behind the loss's back.
:meth:`MoELayer.update_bias` moves the bias once per optimizer step from the loads of
the whole data-parallel world (the trainer sums them; this module does no collective).

Hyper-experts (``model.moe.hyper.enabled``, :mod:`turnout.models.hyper`): the layer holds
an embedding per real expert (``hyper_emb_RC``) and calls the model's one shared
:class:`HyperNet` (attached by the model, not a submodule of the layer, so its weights
are stored once) to add each token's generated adapter to the routed output, in training
and in decoding alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from turnout.config.model import ModelConfig, MoEConfig
from turnout.models import ops
from turnout.models.dispatch import Dispatcher, LocalDispatcher
from turnout.models.experts import ExpertBank
from turnout.models.hyper import HyperNet, condition, init_tables
from turnout.models.layers import SwiGLU
from turnout.models.routing import (
    RoutingPlan,
    expert_capacity,
    load_balance_loss,
    router_z_loss,
)
from turnout.models.terms import Aux, Term

_LOCAL = LocalDispatcher()


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
    hyper_norm: torch.Tensor | None = None
    """Mean L2 norm of the hyper-expert adapter's output per token (detached); None
    without hyper-experts."""


def aux_terms(moe: MoEAux, with_noop: bool) -> Aux:
    """One MoE layer's terms as a block reports them (:class:`Term` -> tensor)."""
    aux: Aux = {
        Term.MOE_LB: moe.load_balance,
        Term.MOE_Z: moe.z_loss,
        Term.MOE_COUNTS: moe.counts_E,
        Term.MOE_DROP: moe.dropped,
    }
    if with_noop:
        aux[Term.MOE_NOOP] = moe.noop_fraction
    if moe.hyper_norm is not None:
        aux[Term.MOE_HYPER] = moe.hyper_norm
    return aux


@dataclass
class Routed:
    """Routing computed outside the layer for the tokens it is given (row t = token t)."""

    logits_TE: torch.Tensor
    """fp32 router logits of these tokens (the aux losses use them)."""
    plan: RoutingPlan | None = None
    """The plan from those logits; None: the layer plans from ``logits_TE`` itself."""


class MoELayer(nn.Module):
    expert_bias: torch.Tensor | None
    """Aux-loss-free selection bias ``[R]`` (fp32, persistent); None under balance 'aux'."""

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
        # Shared experts: one SwiGLU of the summed hidden width (n SwiGLUs side by side),
        # replicated on every rank like any dense weight; its output is added ungated.
        self.shared: SwiGLU | None = None
        if cfg.shared_experts:
            self.shared = SwiGLU(d_model, cfg.shared_experts * hidden)
        self.dispatcher: Dispatcher = LocalDispatcher()
        # A None buffer (balance 'aux') is absent from the state dict: checkpoints of such
        # runs stay as they were.
        bias_R = torch.zeros(cfg.num_experts) if cfg.uses_bias() else None
        self.register_buffer("expert_bias", bias_R, persistent=True)
        # Hyper-experts: this layer's expert embeddings (a unit-scale table, like a token
        # embedding); the shared hypernetwork is attached by the model (attach_hyper).
        self.hyper_emb_RC: nn.Parameter | None = None
        if cfg.hyper.enabled:
            # Off the caller's generator stream (hyper.init_tables); a model draws all its
            # layers' tables again, one after another, so that they differ.
            self.hyper_emb_RC = nn.Parameter(torch.empty(cfg.num_experts, cfg.hyper.embed_dim))
            init_tables([self.hyper_emb_RC])
        self._hyper: list[HyperNet] = []

    def attach_hyper(self, net: HyperNet) -> None:
        """Use ``net``, the model's shared hypernetwork (held outside the module tree)."""
        if self.hyper_emb_RC is None:
            raise ValueError("attach_hyper on a MoE layer without model.moe.hyper.enabled")
        self._hyper[:] = [net]

    def _adapter(
        self, x_TD: torch.Tensor, logits_TE: torch.Tensor, expert_TK: torch.Tensor
    ) -> torch.Tensor | None:
        """Each token's generated adapter output (None without hyper-experts)."""
        if self.hyper_emb_RC is None:
            return None
        if not self._hyper:
            raise ValueError("model.moe.hyper.enabled but no hypernetwork is attached")
        cond_TC = condition(logits_TE[:, : self.num_experts], expert_TK, self.hyper_emb_RC)
        return self._hyper[0](x_TD, cond_TC)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> MoELayer:
        """Keep ``expert_bias`` fp32 through ``.bfloat16()``/``.half()``/``.to(dtype)`` (a
        bf16 DeepSpeed engine casts every buffer): bf16 cannot hold a bias that moves by
        1e-3 steps. Device moves still apply; the fp32 value is kept exactly."""
        bias = self.expert_bias
        super()._apply(fn, recurse)
        if bias is not None and self.expert_bias is not None:
            moved = self.expert_bias
            if moved.dtype != torch.float32:
                self._buffers["expert_bias"] = bias.to(moved.device)
        return self

    def selection_bias(self) -> torch.Tensor | None:
        """The bias the top-k choice adds to the real-expert logits (None: no bias)."""
        return self.expert_bias

    @torch.no_grad()
    def update_bias(self, counts_R: torch.Tensor) -> None:
        """One aux-loss-free step from ``counts_R``, this layer's assignments per real
        expert summed over every rank and micro step since the last update. Pure and
        deterministic: equal counts on every rank keep the replicas equal."""
        if self.expert_bias is None:
            return
        self.expert_bias.copy_(bias_step(self.expert_bias, counts_R, self.cfg.bias_rate))

    def plan(self, logits_TE: torch.Tensor, capacity: int | None) -> RoutingPlan:
        """The routing plan of these logits (with the selection bias when there is one)."""
        return ops.moe_plan(
            logits_TE,
            self.top_k,
            capacity,
            self.cfg.gates_normalized(),
            self.num_experts,
            self.selection_bias(),
        )

    def dropless_local(self, x_TD: torch.Tensor, logits_TE: torch.Tensor) -> torch.Tensor:
        """The layer's output for these tokens, dropless, on this process's experts,
        whatever ``capacity_factor`` and the installed dispatcher say: how it decodes
        (design §3.4, "MoE decodes dropless"). The training path's kept rows: a step of
        one token runs its k chosen experts on one row each, not every expert."""
        plan = self.plan(logits_TE, None)  # with the selection bias when there is one
        y_TD = self._plus_shared(x_TD, _LOCAL(x_TD, plan, self.experts))
        adapter_TD = self._adapter(x_TD, logits_TE, plan.expert_TK)
        return y_TD if adapter_TD is None else y_TD + adapter_TD.to(y_TD.dtype)

    def _plus_shared(self, x_TD: torch.Tensor, y_TD: torch.Tensor) -> torch.Tensor:
        """The routed output plus the shared experts' (when the layer has any)."""
        if self.shared is None:
            return y_TD
        return y_TD + self.shared(x_TD).to(y_TD.dtype)

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
            plan = self.plan(logits_TE, self.capacity(T))
        y_TD = self._plus_shared(x_TD, self.dispatcher(x_TD, plan, self.experts))
        adapter_TD = self._adapter(x_TD, logits_TE, plan.expert_TK)
        hyper_norm = None
        if adapter_TD is not None:  # the statistic is training's; decoding skips it
            y_TD = y_TD + adapter_TD.to(y_TD.dtype)
            norms_T = adapter_TD.detach().float().norm(dim=-1)
            hyper_norm = norms_T.mean() if norms_T.numel() else norms_T.new_zeros(())
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
            hyper_norm=hyper_norm,
        )
        return y_TD, aux


def bias_step(bias_R: torch.Tensor, counts_R: torch.Tensor, rate: float) -> torch.Tensor:
    """The next selection bias: each expert's bias moves by ``rate`` toward the mean load
    (up when under-loaded, down when over-loaded, not at all when exactly at the mean),
    then the mean bias is subtracted. A common shift changes no choice among real
    experts, so centring changes nothing there; it stops the biases drifting together
    against the unbiased no-op columns. fp32 on the bias's device."""
    load_R = counts_R.to(bias_R.device, torch.float64)
    new_R = bias_R.double() + rate * torch.sign(load_R.mean() - load_R)
    return (new_R - new_R.mean()).to(torch.float32)


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every MoE layer of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def moe_by_layer(model: nn.Module) -> dict[int, MoELayer]:
    """The MoE layer of each block of a ``TransformerLM`` by block index (the index of
    ``LMOutput.stats``); blocks without one are absent."""
    out: dict[int, MoELayer] = {}
    for i, block in enumerate(model.get_submodule("layers").children()):
        for m in block.modules():
            if isinstance(m, MoELayer):
                out[i] = m
    return out


def update_expert_bias(model: nn.Module, counts: dict[int, torch.Tensor]) -> None:
    """One bias step for every biased MoE layer; ``counts[i]``: block i's global
    assignments per real expert (blocks missing from ``counts`` are left alone)."""
    for i, moe in moe_by_layer(model).items():
        if i in counts:
            moe.update_bias(counts[i])
