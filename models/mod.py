"""Mixture-of-Depths: expert-choice top-k over positions around a transformer block.

Shape legend: B batch, S sequence, M chosen positions per sequence (k), D width.

Training (``routing="topk"``): one scalar router score per token; the top
``k = ceil(capacity * S)`` positions of each sequence, kept in position order, go
through the block (attention among them, causal by original position, RoPE at their
real positions); the block's residual increment is scaled by ``g(score)`` so the
router gets gradient; all other tokens pass through bit-identical.

Sampling (``routing="causal"``): top-k over a sequence looks at the future, so a
per-token decision is needed. A predictor (a small MLP on the stop-gradient input,
or the router itself under an auxiliary BCE) is trained to predict top-k membership;
in causal mode its decision (logit > 0) picks the tokens, and the block runs in the
masked-dense form, which is exact for any per-token choice, S = 1 included.

Router on the block input (``model.moe.router_input: block``, 'mode' blocks): the MoE
router reads the block input ``x`` next to the MoD router, so in top-k routing one
fused op (``ops.mode_plan``) gives the MoD choice and the expert plan of the chosen
tokens together; the block's MoE then runs that plan. In causal routing the plan comes
from the chosen rows of the same block-input logits. The aux losses use the logits of
the routed (chosen) rows only. Shape N = B * S rows, E router columns, T = routed rows.

Decoding (:meth:`MoDBlock.decode_step`, design §3.4): the predictor's decision per new
token; a skipped token does no work and writes nothing to the block's cache. Early exit:
an exited token is a key in every later block, routed ones included, whatever the
predictor would say (its K/V from its exit state, nothing else), in decode and in the
causal pass alike, so once every row of a decode call has exited the block runs neither
predictor nor router (:meth:`MoDBlock.propagate`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from turnout.config.choices import Predictor, RouterGate, RouterInput, Routing
from turnout.config.model import ModelConfig
from turnout.models import ops
from turnout.models.block import Block, keys_and_work, keys_mask
from turnout.models.kvcache import KVCache, LayerState
from turnout.models.moe import Routed
from turnout.models.routing import chosen_rows, mod_capacity
from turnout.models.terms import Aux, Term

#: The causal decision: a predictor logit above this (probability 1/2) runs the block.
CHOOSE_ABOVE_LOGIT = 0.0


class MoDBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, block: Block) -> None:
        super().__init__()
        self.block = block
        self.capacity = cfg.mod.capacity
        self.router_gate = RouterGate(cfg.mod.router_gate)
        # Only a block with an MoE FFN has an expert router to move in front of the block.
        self.router_input = (
            RouterInput(cfg.moe.router_input) if block.kind.has_moe else RouterInput.FFN
        )
        self.router = nn.Linear(cfg.d_model, 1, bias=False)
        nn.init.normal_(self.router.weight, std=cfg.init_std)
        self.predictor: nn.Module | None = None
        if cfg.mod.predictor == Predictor.MLP:
            h = cfg.mod.predictor_hidden
            self.predictor = nn.Sequential(nn.Linear(cfg.d_model, h), nn.SiLU(), nn.Linear(h, 1))

    def gate(self, score: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(score) if self.router_gate is RouterGate.SIGMOID else score

    def scores(self, x_BSD: torch.Tensor) -> torch.Tensor:
        return self.router(x_BSD).squeeze(-1).float()

    def causal_logits(self, x_BSD: torch.Tensor, score_BS: torch.Tensor) -> torch.Tensor:
        """Per-token logit of 'this token is in its sequence's top-k' (causal)."""
        if self.predictor is None:
            return score_BS
        return self.predictor(x_BSD.detach()).squeeze(-1).float()

    @property
    def routes_from_block_input(self) -> bool:
        return self.router_input is RouterInput.BLOCK

    def block_logits(self, x_BSD: torch.Tensor) -> torch.Tensor:
        """fp32 MoE router logits of every position from the block input: ``[B * S, E]``."""
        B, S, D = x_BSD.shape
        return self.block.moe().router_logits(x_BSD.reshape(B * S, D))

    def forward(
        self,
        x_BSD: torch.Tensor,
        pos_BS: torch.Tensor,
        routing: str = Routing.TOPK,
        exited_BS: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Aux]:
        """``exited_BS``: causal routing's early-exited tokens (keys only; see above)."""
        B, S, D = x_BSD.shape
        if routing not in Routing.values():
            raise ValueError(f"routing must be {Routing.spelled()}, got {routing!r}")
        score_BS = self.scores(x_BSD)
        pred_BS = self.causal_logits(x_BSD, score_BS)
        k = mod_capacity(S, self.capacity)
        # The predictor's target is always top-k membership in the sequence it sees (also in
        # causal mode, where the block runs on the predictor's own decisions instead).
        if routing == Routing.TOPK and self.routes_from_block_input:
            idx_BM, topk_BS, routed = self._fused_plan(x_BSD, score_BS, k)
        else:
            idx_BM, topk_BS = ops.mod_select(score_BS, k)
            routed = None
        if routing == Routing.TOPK:
            chosen_BS = topk_BS
            out_BSD, aux = self._compact(x_BSD, pos_BS, score_BS, idx_BM, routed)
        else:
            chosen_BS = pred_BS > CHOOSE_ABOVE_LOGIT
            out_BSD, aux = masked_dense(self, x_BSD, pos_BS, score_BS, chosen_BS, exited_BS)
        target_BS = topk_BS.float()
        aux[Term.MOD_PRED_LOSS] = F.binary_cross_entropy_with_logits(pred_BS, target_BS)
        aux[Term.MOD_CAPACITY] = chosen_BS.float().mean().detach()
        agree_BS = (pred_BS > CHOOSE_ABOVE_LOGIT) == topk_BS
        aux[Term.MOD_PRED_ACC] = agree_BS.float().mean().detach()
        return out_BSD, aux

    def new_decode_state(self, cache: Callable[[], KVCache]) -> LayerState:
        """Empty decode state: one cache, holding the tokens the block processes."""
        return LayerState(cache(), routed=True)

    def decode_step(
        self,
        x_BSD: torch.Tensor,
        pos_BS: torch.Tensor,
        state: LayerState,
        exited_BS: torch.Tensor | None = None,
        threshold: float = 1.0,
    ) -> torch.Tensor:
        """New positions through the block: the chosen ones run (``x + g * increment``),
        the others do no work and write nothing to the cache; exited ones (``exited_BS``,
        None: none) only write their K/V. ``threshold``: the ponder block's, unused."""
        score_BS = self.scores(x_BSD)
        chosen_BS = self.causal_logits(x_BSD, score_BS) > CHOOSE_ABOVE_LOGIT
        keys_BS, work_BS = keys_and_work(chosen_BS, exited_BS)
        block_input = self.routes_from_block_input
        g_BS = self.gate(score_BS)
        return self.block.cached_step(
            x_BSD, pos_BS, state, state.cache, keys_BS, work_BS, g_BS, block_input
        )

    def propagate(self, x_BSD: torch.Tensor, pos_BS: torch.Tensor, state: LayerState) -> None:
        """Every row has exited: only their K/V into the cache (no predictor, no router)."""
        self.block.propagate(x_BSD, pos_BS, state)

    def _fused_plan(
        self, x_BSD: torch.Tensor, score_BS: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor, Routed]:
        """MoD top-k and the chosen tokens' expert plan in one op, from the block input."""
        B, S, _ = x_BSD.shape
        moe = self.block.moe()
        logits_NE = self.block_logits(x_BSD)
        idx_BM, topk_BS, plan = ops.mode_plan(
            score_BS,
            k,
            logits_NE,
            moe.top_k,
            moe.capacity(B * k),
            moe.cfg.gates_normalized(),
            moe.num_experts,
            moe.selection_bias(),
        )
        return idx_BM, topk_BS, Routed(logits_NE[chosen_rows(idx_BM, S)], plan)

    def _compact(
        self,
        x_BSD: torch.Tensor,
        pos_BS: torch.Tensor,
        score_BS: torch.Tensor,
        idx_BM: torch.Tensor,
        routed: Routed | None = None,
    ) -> tuple[torch.Tensor, Aux]:
        D = x_BSD.shape[-1]
        idx_BMD = idx_BM.unsqueeze(-1).expand(-1, -1, D)
        x_BMD = x_BSD.gather(1, idx_BMD)
        pos_BM = pos_BS.gather(1, idx_BM)
        delta_BMD, aux = self.block.increment(x_BMD, pos_BM, routed=routed)
        g_BM1 = self.gate(score_BS.gather(1, idx_BM)).unsqueeze(-1).to(x_BSD.dtype)
        new_BMD = x_BMD + g_BM1 * delta_BMD
        return x_BSD.scatter(1, idx_BMD, new_BMD), aux


def masked_dense(
    mod: MoDBlock,
    x_BSD: torch.Tensor,
    pos_BS: torch.Tensor,
    score_BS: torch.Tensor,
    chosen_BS: torch.Tensor,
    exited_BS: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Aux]:
    """The MoD block with every token computed and attention keys masked to the chosen.

    Unchosen outputs are replaced by the input. For a top-k choice this equals the
    compacted form; for any other per-token choice it is the definition of the block.
    A block routing from its input plans the chosen rows of its block-input logits.
    ``exited_BS`` (early exit): keys whatever their choice, never run (output: input).
    """
    B, S, _ = x_BSD.shape
    keys_BS, work_BS = keys_and_work(chosen_BS, exited_BS)
    if work_BS is None:
        work_BS = chosen_BS
    mask_BSS = keys_mask(keys_BS)
    routed = None
    if mod.routes_from_block_input:
        routed = Routed(mod.block_logits(x_BSD)[work_BS.reshape(-1)])
    delta_BSD, aux = mod.block.increment(x_BSD, pos_BS, mask_BSS, work_BS, routed)
    g_BS1 = mod.gate(score_BS).unsqueeze(-1).to(x_BSD.dtype)
    out_BSD = torch.where(work_BS.unsqueeze(-1), x_BSD + g_BS1 * delta_BSD, x_BSD)
    return out_BSD, aux
