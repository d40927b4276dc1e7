"""Mixture-of-Recursions: one group of blocks reused per token a router-chosen number of times.

Shape legend: R recursions (``model.recursion.max_recursions``), B batch, S sequence, M
positions a recursion runs per sequence, D width, G key/value heads, Hd head dim, L keys.

A 'recursion' entry of the layer pattern builds ``model.recursion.group`` dense blocks
whose weights every recursion reuses; one recursion runs the group's blocks in order. A
token that runs recursion r leaves it with ``h + g * (group(h) - h)``, ``g`` its gate; a
token that does not keeps its state, and it runs no later recursion either (depth is a
prefix: recursions 1..d).

Routing (``model.recursion.routing``):

- **expert** (expert-choice, the default): before recursion r a router column scores the
  state ``h`` of every position; of the tokens that ran recursion r-1 (every token for
  r = 1) each sequence keeps its top ``k_r = ceil(capacity_r * S)`` (capacities
  non-increasing, so ``k_r`` never exceeds the tokens still running). Training has static
  shapes: recursion r runs on exactly ``k_r`` compacted positions per sequence, in
  position order, at their real RoPE positions. ``g = sigmoid(score)`` (or the score:
  ``router_gate: identity``). Top-k looks at the future, so each routed recursion has a
  causal predictor (a small MLP on the stop-gradient state, or the router score itself)
  trained with a BCE against top-k membership among the tokens that could be chosen; in
  causal routing and decoding a token runs recursion r when it ran r-1 and the
  predictor's logit is above 0. A recursion of capacity 1 runs every token that reached
  it, without a decision.
- **token** (token-choice): one router at the group's entry gives each token its depth
  ``d = argmax softmax(logits_R) + 1`` and the gate ``g = p_d`` at every recursion it
  runs; a load-balance loss ``R * sum_d f_d P_d`` keeps the depths in use. Causal by
  construction: training, causal routing and decoding take the same decision. Training
  runs it in the masked-dense form (every recursion computes every token, which keeps
  shapes static; the unchosen rows are discarded), so its savings are at decode time.

Keys and values (``model.recursion.cache``):

- **per_recursion**: recursion r attends over the tokens that ran recursion r (causally,
  itself included); decoding keeps one cache per recursion and block of the group, and a
  token writes to recursion r's cache only when it runs it (cache lengths = processed
  counts).
- **shared_first**: recursion 1 attends and caches as above; later recursions compute
  only their queries and attend over recursion 1's keys and values of the tokens at or
  before them, and cache nothing (one cache per block of the group).

Aux terms: the predictors' BCE (``recursion_pred_loss``, expert), the depth balance loss
(``recursion_balance``, token), the mean recursions per token and the predictors'
agreement with top-k. Activation checkpointing replays the top-k choices and the
token-choice depths (``recompute.decide``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from turnout.config.choices import (
    Predictor,
    RecursionCache,
    RecursionRouting,
    RouterGate,
    Routing,
)
from turnout.config.model import ModelConfig
from turnout.models import ops, recompute
from turnout.models.block import Block, keys_mask
from turnout.models.kvcache import KVCache, LayerState
from turnout.models.routing import load_balance_loss, mod_capacity
from turnout.models.terms import Aux, Term

#: The causal decision: a predictor logit above this runs the recursion (as MoD's).
CHOOSE_ABOVE_LOGIT = 0.0

#: Recursion 1's keys and values of one block of the group and the positions they hold:
#: ``(k_BGLd, v_BGLd, pos_BL)``.
FirstKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class RecursionBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, blocks: list[Block]) -> None:
        super().__init__()
        rc = cfg.recursion
        self.blocks = nn.ModuleList(blocks)
        self.max_recursions = rc.max_recursions
        self.routing = RecursionRouting(rc.routing)
        self.shared_kv = rc.cache == RecursionCache.SHARED_FIRST
        self.capacities = rc.schedule()
        self.router_gate = RouterGate(rc.router_gate)
        # Expert routing: column r scores the state before recursion r. Token routing: the
        # logits over the R depths, read once at the group's entry.
        self.router = nn.Linear(cfg.d_model, rc.max_recursions, bias=False)
        nn.init.normal_(self.router.weight, std=cfg.init_std)
        # Expert routing's recursions of capacity below 1 take a decision (token routing
        # decides once, at the entry): fixed by the config, so computed once.
        self._decided = (
            [r for r, c in enumerate(self.capacities) if c < 1.0]
            if self.routing is RecursionRouting.EXPERT
            else []
        )
        self.predictors = nn.ModuleDict()
        if self.routing is RecursionRouting.EXPERT and rc.predictor == Predictor.MLP:
            h = rc.predictor_hidden
            for r in self.decided():
                self.predictors[str(r)] = nn.Sequential(
                    nn.Linear(cfg.d_model, h), nn.SiLU(), nn.Linear(h, 1)
                )

    @property
    def group(self) -> int:
        return len(self.blocks)

    def group_blocks(self) -> list[Block]:
        """The shared group's blocks, in the order a recursion runs them."""
        return [cast(Block, b) for b in self.blocks]

    def decided(self) -> list[int]:
        """The recursions (0-based) whose tokens a decision picks: expert routing's
        recursions of capacity below 1 (token routing decides once, at the entry)."""
        return self._decided

    # --- routing -------------------------------------------------------------------------

    def scores(self, h_BSD: torch.Tensor, r: int) -> torch.Tensor:
        """fp32 router score of every position before recursion ``r`` (expert routing)."""
        return F.linear(h_BSD, self.router.weight[r : r + 1]).squeeze(-1).float()

    def gate(self, score_BS: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(score_BS) if self.router_gate is RouterGate.SIGMOID else score_BS

    def causal_logits(self, h_BSD: torch.Tensor, score_BS: torch.Tensor, r: int) -> torch.Tensor:
        """Per-token logit of 'this token is in recursion r's top-k' (causal)."""
        key = str(r)
        if key not in self.predictors:
            return score_BS
        return self.predictors[key](h_BSD.detach()).squeeze(-1).float()

    def depths(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token routing at the group's entry: ``depth_BS`` (1..R), the gate ``g_BS`` (the
        chosen depth's probability) and the fp32 ``probs_BSR``."""
        logits_BSR = self.router(x_BSD).float()
        probs_BSR = torch.softmax(logits_BSR, dim=-1)
        choice_BS = recompute.decide("recursion_depth", lambda: logits_BSR.argmax(-1))
        g_BS = probs_BSR.gather(-1, choice_BS.unsqueeze(-1)).squeeze(-1)
        return choice_BS + 1, g_BS, probs_BSR

    # --- training and the full-sequence forms ----------------------------------------------

    def forward(
        self, x_BSD: torch.Tensor, pos_BS: torch.Tensor, routing: str = Routing.TOPK
    ) -> tuple[torch.Tensor, torch.Tensor, Aux]:
        """The group's recursions: the output, the recursions each token ran
        (``recursions_BS``) and the aux terms. ``routing``: 'topk' (training) or 'causal'
        (expert routing's predictor decisions; token routing decides the same either way)."""
        if routing not in Routing.values():
            raise ValueError(f"routing must be {Routing.spelled()}, got {routing!r}")
        if self.routing is RecursionRouting.TOKEN:
            return self._token(x_BSD, pos_BS)
        if routing == Routing.TOPK:
            return self._topk(x_BSD, pos_BS)
        return self._causal(x_BSD, pos_BS)

    def _topk(
        self, x_BSD: torch.Tensor, pos_BS: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Aux]:
        B, S, _ = x_BSD.shape
        h_BSD = x_BSD
        eligible_BS = torch.ones(B, S, dtype=torch.bool, device=x_BSD.device)
        recursions_BS = torch.zeros(B, S, dtype=torch.long, device=x_BSD.device)
        first: list[FirstKV] = []
        bce, agree = [], []
        for r in range(self.max_recursions):
            score_BS = self.scores(h_BSD, r)
            k = mod_capacity(S, self.capacities[r])
            # Only the tokens that ran the previous recursion can be chosen (k never
            # exceeds them: the capacities do not increase).
            masked_BS = score_BS.masked_fill(~eligible_BS, torch.finfo(torch.float32).min)
            idx_BM, chosen_BS = ops.mod_select(masked_BS, k)
            if r in self.decided():
                pred_BS = self.causal_logits(h_BSD, score_BS, r)
                target_BS = chosen_BS.float()
                bce.append(
                    F.binary_cross_entropy_with_logits(pred_BS[eligible_BS], target_BS[eligible_BS])
                )
                hit_BS = (pred_BS > CHOOSE_ABOVE_LOGIT) == chosen_BS
                agree.append(hit_BS[eligible_BS].float().mean())
            h_BSD = self._compact(h_BSD, pos_BS, score_BS, idx_BM, r, first)
            recursions_BS = recursions_BS + chosen_BS.long()
            eligible_BS = chosen_BS
        aux: Aux = {Term.REC_DEPTH: recursions_BS.float().mean().detach()}
        if bce:
            aux[Term.REC_PRED_LOSS] = torch.stack(bce).mean()
            aux[Term.REC_PRED_ACC] = torch.stack(agree).mean().detach()
        return h_BSD, recursions_BS, aux

    def _compact(
        self,
        h_BSD: torch.Tensor,
        pos_BS: torch.Tensor,
        score_BS: torch.Tensor,
        idx_BM: torch.Tensor,
        r: int,
        first: list[FirstKV],
    ) -> torch.Tensor:
        """Recursion ``r`` on the chosen positions ``idx_BM`` only (static shapes)."""
        D = h_BSD.shape[-1]
        idx_BMD = idx_BM.unsqueeze(-1).expand(-1, -1, D)
        x_BMD = h_BSD.gather(1, idx_BMD)
        pos_BM = pos_BS.gather(1, idx_BM)
        y_BMD = x_BMD
        for j, block in enumerate(self.group_blocks()):
            if self.shared_kv and r > 0:
                k_BGLd, v_BGLd, pos_BL = first[j]
                mask_BML = pos_BL.unsqueeze(1) <= pos_BM.unsqueeze(2)
                delta_BMD, _, _ = block.increment_kv(y_BMD, pos_BM, mask_BML, over=(k_BGLd, v_BGLd))
            else:  # the chosen positions in position order: index-causal is causal
                delta_BMD, _, (k_BGMd, v_BGMd) = block.increment_kv(y_BMD, pos_BM)
                if self.shared_kv:
                    first.append((k_BGMd, v_BGMd, pos_BM))
            y_BMD = y_BMD + delta_BMD
        g_BM1 = self.gate(score_BS.gather(1, idx_BM)).unsqueeze(-1).to(h_BSD.dtype)
        return h_BSD.scatter(1, idx_BMD, x_BMD + g_BM1 * (y_BMD - x_BMD))

    def _masked(
        self,
        h_BSD: torch.Tensor,
        pos_BS: torch.Tensor,
        run_BS: torch.Tensor,
        g_BS: torch.Tensor,
        r: int,
        first: list[tuple[torch.Tensor, torch.Tensor]],
        first_BS: torch.Tensor | None,
    ) -> torch.Tensor:
        """Recursion ``r`` in the masked-dense form: every position computed, keys masked
        to the tokens that run it (``first_BS``, recursion 1's, for a shared cache), the
        rows outside ``run_BS`` keeping their state. Exact for any per-token choice."""
        over_first = self.shared_kv and r > 0
        keys_BS = first_BS if over_first and first_BS is not None else run_BS
        mask_BSS = keys_mask(keys_BS)
        y_BSD = h_BSD
        for j, block in enumerate(self.group_blocks()):
            over = first[j] if over_first else None
            delta_BSD, _, kv = block.increment_kv(y_BSD, pos_BS, mask_BSS, over=over)
            if self.shared_kv and r == 0:
                first.append(kv)
            y_BSD = y_BSD + delta_BSD
        g_BS1 = g_BS.unsqueeze(-1).to(h_BSD.dtype)
        return torch.where(run_BS.unsqueeze(-1), h_BSD + g_BS1 * (y_BSD - h_BSD), h_BSD)

    def _causal(
        self, x_BSD: torch.Tensor, pos_BS: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Aux]:
        """Expert routing under the predictors' decisions (what decoding reproduces)."""
        B, S, _ = x_BSD.shape
        h_BSD = x_BSD
        run_BS = torch.ones(B, S, dtype=torch.bool, device=x_BSD.device)
        recursions_BS = torch.zeros(B, S, dtype=torch.long, device=x_BSD.device)
        first: list[tuple[torch.Tensor, torch.Tensor]] = []
        first_BS: torch.Tensor | None = None
        for r in range(self.max_recursions):
            score_BS = self.scores(h_BSD, r)
            if r in self.decided():
                run_BS = run_BS & (self.causal_logits(h_BSD, score_BS, r) > CHOOSE_ABOVE_LOGIT)
            h_BSD = self._masked(h_BSD, pos_BS, run_BS, self.gate(score_BS), r, first, first_BS)
            first_BS = run_BS if first_BS is None else first_BS
            recursions_BS = recursions_BS + run_BS.long()
        return h_BSD, recursions_BS, {Term.REC_DEPTH: recursions_BS.float().mean().detach()}

    def _token(
        self, x_BSD: torch.Tensor, pos_BS: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Aux]:
        """Token routing: each token runs recursions 1..depth (masked-dense, static)."""
        B, S, _ = x_BSD.shape
        depth_BS, g_BS, probs_BSR = self.depths(x_BSD)
        h_BSD = x_BSD
        first: list[tuple[torch.Tensor, torch.Tensor]] = []
        first_BS: torch.Tensor | None = None
        for r in range(self.max_recursions):
            run_BS = depth_BS > r
            h_BSD = self._masked(h_BSD, pos_BS, run_BS, g_BS, r, first, first_BS)
            first_BS = run_BS if first_BS is None else first_BS
        balance = load_balance_loss(probs_BSR.reshape(B * S, -1), (depth_BS - 1).reshape(B * S, 1))
        aux: Aux = {
            Term.REC_BALANCE: balance,
            Term.REC_DEPTH: depth_BS.float().mean().detach(),
        }
        return h_BSD, depth_BS, aux

    # --- cached decode -------------------------------------------------------------------

    def new_decode_state(self, cache: Callable[[], KVCache]) -> LayerState:
        """Empty decode state: a cache per recursion and block of the group
        (``shared_first``: per block, recursion 1's), recursion-major."""
        n = self.group if self.shared_kv else self.max_recursions * self.group
        caches = [cache() for _ in range(n)]
        return LayerState(caches[0], routed=True, more=caches[1:])

    def _cache(self, state: LayerState, r: int, j: int) -> KVCache:
        return state.caches[j if self.shared_kv else r * self.group + j]

    def decode_step(
        self,
        x_BSD: torch.Tensor,
        pos_BS: torch.Tensor,
        state: LayerState,
        exited_BS: torch.Tensor | None = None,
        threshold: float = 1.0,
    ) -> torch.Tensor:
        """New positions through the recursions: a token runs recursion r when it ran r-1
        and its decision says so; it then attends over (and, per recursion, fills) that
        recursion's caches. A token that stops does no more work and writes nothing.
        ``state.steps_BS``: block applications (recursions x group). ``threshold`` is the
        ponder block's; early exit does not combine with recursion (ValueError)."""
        if exited_BS is not None:
            raise ValueError("early exit and a recursion block cannot be combined")
        B, S, _ = x_BSD.shape
        run_BS = torch.ones(B, S, dtype=torch.bool, device=x_BSD.device)
        recursions_BS = torch.zeros(B, S, dtype=torch.long, device=x_BSD.device)
        token = self.routing is RecursionRouting.TOKEN
        if token:
            depth_BS, g_BS, _ = self.depths(x_BSD)
        for r in range(self.max_recursions):
            if token:
                run_BS = depth_BS > r
            else:
                score_BS = self.scores(x_BSD, r)
                g_BS = self.gate(score_BS)
                if r in self.decided():
                    logits_BS = self.causal_logits(x_BSD, score_BS, r)
                    run_BS = run_BS & (logits_BS > CHOOSE_ABOVE_LOGIT)
            if not bool(run_BS.any()):  # a host sync: nothing left to run
                state.skipped += B * S * (self.max_recursions - r)
                break
            x_BSD = self.group_blocks()[0].cached_step(
                x_BSD,
                pos_BS,
                state,
                self._cache(state, r, 0),
                keys_BS=run_BS,
                g_BS=g_BS,
                increment=partial(self._group_cached, state, r),
            )
            recursions_BS = recursions_BS + run_BS.long()
        state.steps_BS = recursions_BS * self.group
        return x_BSD

    def _group_cached(
        self,
        state: LayerState,
        r: int,
        x_bMD: torch.Tensor,
        pos_bM: torch.Tensor,
        counts: list[int],
        rows: list[int] | None,
        ffn_bM: torch.Tensor | None,
        router_x_ND: torch.Tensor | None,
    ) -> torch.Tensor:
        """Recursion ``r``'s group on compacted rows over its caches: ``group(x) - x``."""
        y_bMD = x_bMD
        read_only = self.shared_kv and r > 0
        for j, block in enumerate(self.group_blocks()):
            cache = self._cache(state, r, j)
            y_bMD = y_bMD + block.cached_increment(
                y_bMD, pos_bM, cache, counts, rows, ffn_bM, None, read_only
            )
        return y_bMD - x_bMD

    def propagate(self, x_BSD: torch.Tensor, pos_BS: torch.Tensor, state: LayerState) -> None:
        """Early exit does not combine with recursion (validation refuses it)."""
        raise ValueError("early exit and a recursion block cannot be combined")
