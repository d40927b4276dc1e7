"""A pre-norm transformer block whose FFN is dense SwiGLU or a MoE layer.

Shape legend: B batch, b the sequences of B that run in one cached call, S positions
(full or compacted), M kept positions per sequence in one cached call (padded to the
largest), L cache slots, D width, H query heads, G key/value heads, Hd head dim, N rows
reaching the FFN, E router columns.
``increment`` returns only what the block adds to the residual stream; MoD routing
scales that increment, so the residual is never counted twice.

Cached decode (design §3.4; :mod:`turnout.models.decode` drives it): ``decode_step``
feeds new positions through the block and its :class:`KVCache`; ``cached_step`` is the
general form the MoD and ponder blocks call (which positions write keys, which get the
increment), and ``propagate`` is the early-exit path once every row of a call has
exited: only the K/V projection of the exit states, appended to the block's caches.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from turnout.config.model import FFN_DENSE, FFN_MOE, BlockKind, ModelConfig
from turnout.models.kvcache import KVCache, LayerState
from turnout.models.layers import Attention, RMSNorm, Rotary, SwiGLU
from turnout.models.moe import MoELayer, Routed, aux_terms
from turnout.models.terms import Aux

#: The residual increment of compacted rows in a cached step: ``(x_bMD, pos_bM, counts,
#: rows, ffn_bM, router_x_ND) -> delta_bMD`` (:meth:`Block.cached_increment`'s form).
Increment = Callable[
    [
        torch.Tensor,
        torch.Tensor,
        list[int],
        "list[int] | None",
        "torch.Tensor | None",
        "torch.Tensor | None",
    ],
    torch.Tensor,
]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: Rotary, kind: BlockKind) -> None:
        super().__init__()
        self.norm_attn = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(
            cfg.d_model,
            cfg.n_heads,
            rotary,
            cfg.kv_heads(),
            cfg.head_size(),
            cfg.norm_eps if cfg.qk_norm else None,
        )
        self.norm_ffn = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.kind = kind
        if kind.ffn == FFN_DENSE:
            self.ffn: nn.Module = SwiGLU(cfg.d_model, cfg.ffn_dim)
        elif kind.ffn == FFN_MOE:
            self.ffn = MoELayer(
                cfg.d_model, cfg.expert_hidden(), cfg.moe, cfg.init_std, cfg.noop_choices(kind)
            )
        else:
            raise ValueError(f"unknown ffn kind {kind.ffn!r}")

    def moe(self) -> MoELayer:
        """The block's MoE FFN (a dense block has none: ValueError)."""
        if not isinstance(self.ffn, MoELayer):
            raise ValueError(f"a {self.kind.name!r} block has no MoE FFN")
        return self.ffn

    def _ffn(self, h_ND: torch.Tensor, routed: Routed | None) -> tuple[torch.Tensor, Aux]:
        if not isinstance(self.ffn, MoELayer):
            if routed is not None:
                raise ValueError("routing was given to a block with a dense FFN")
            return self.ffn(h_ND), {}
        y_ND, moe = self.ffn(h_ND, routed)
        return y_ND, aux_terms(moe, bool(self.ffn.num_noop))

    def increment(
        self,
        x_BSD: torch.Tensor,
        pos_BS: torch.Tensor,
        mask_BSS: torch.Tensor | None = None,
        rows_BS: torch.Tensor | None = None,
        routed: Routed | None = None,
    ) -> tuple[torch.Tensor, Aux]:
        """The block's residual increment ``block(x) - x``, computed directly.

        ``mask_BSS`` replaces the causal mask; ``rows_BS`` limits the FFN to those rows
        (others get a zero FFN increment) — both serve the masked-dense MoD path.
        ``routed`` is the MoE routing of the rows reaching the FFN (all ``B * S`` rows,
        or those of ``rows_BS``, in row-major order), computed by the caller.
        """
        delta_BSD, aux, _ = self.increment_kv(x_BSD, pos_BS, mask_BSS, rows_BS, routed)
        return delta_BSD, aux

    def increment_kv(
        self,
        x_BSD: torch.Tensor,
        pos_BS: torch.Tensor,
        mask_BSL: torch.Tensor | None = None,
        rows_BS: torch.Tensor | None = None,
        routed: Routed | None = None,
        over: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, Aux, tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`increment`, with the attention's keys and values ``(k_BGLd, v_BGLd)``.

        ``over`` (None: the rows' own) are keys and values computed before, which the
        rows attend over instead of their own: only the queries are projected, and
        ``mask_BSL`` (required then) says which of the L keys each row sees. A recursion
        block's later recursions attend over the first one's this way.
        """
        n_BSD = self.norm_attn(x_BSD)
        if over is None:
            q_BHSd, k_BGLd, v_BGLd = self.attn.heads(n_BSD, pos_BS)
        else:
            if mask_BSL is None:
                raise ValueError("attending over given keys needs a mask")
            q_BHSd, (k_BGLd, v_BGLd) = self.attn.q(n_BSD, pos_BS), over
        a_BSD = self.attn.attend(q_BHSd, k_BGLd, v_BGLd, mask_BSL, causal=True)
        h_BSD = self.norm_ffn(x_BSD + a_BSD)
        B, S, D = h_BSD.shape
        if rows_BS is None:
            f_ND, aux = self._ffn(h_BSD.reshape(B * S, D), routed)
            f_BSD = f_ND.view(B, S, D)
        else:
            f_ND, aux = self._ffn(h_BSD[rows_BS], routed)
            f_BSD = torch.zeros_like(h_BSD).index_put((rows_BS,), f_ND.to(h_BSD.dtype))
        return a_BSD + f_BSD, aux, (k_BGLd, v_BGLd)

    def forward(self, x_BSD: torch.Tensor, pos_BS: torch.Tensor) -> tuple[torch.Tensor, Aux]:
        delta_BSD, aux = self.increment(x_BSD, pos_BS)
        return x_BSD + delta_BSD, aux

    # --- cached decode -------------------------------------------------------------------

    def new_decode_state(self, cache: Callable[[], KVCache]) -> LayerState:
        """Empty decode state: one cache (``cache()`` makes one)."""
        return LayerState(cache())

    def decode_step(
        self,
        x_BSD: torch.Tensor,
        pos_BS: torch.Tensor,
        state: LayerState,
        exited_BS: torch.Tensor | None = None,
        threshold: float = 1.0,
    ) -> torch.Tensor:
        """``S`` new positions of every sequence through the block and its cache.

        Every position writes its keys/values. ``exited_BS`` (early exit; None: no row has
        exited) marks rows that only serve as keys: their state comes back unchanged.
        ``threshold`` is the ponder block's; a plain block has no decision to take.
        """
        if exited_BS is not None:
            return self.cached_step(x_BSD, pos_BS, state, state.cache, work_BS=~exited_BS)
        B, S, _ = x_BSD.shape
        state.processed += B * S
        return x_BSD + self.cached_increment(x_BSD, pos_BS, state.cache, [S] * B)

    def propagate(self, x_BSD: torch.Tensor, pos_BS: torch.Tensor, state: LayerState) -> None:
        """Every row of the call has exited (CALM state propagation): only the K/V
        projection of the exit states, appended to each of the block's caches."""
        B, S, _ = x_BSD.shape
        k_BGSd, v_BGSd = self.attn.kv(self.norm_attn(x_BSD), pos_BS)
        for cache in state.caches:
            cache.append(k_BGSd, v_BGSd, [S] * B)
        state.propagated += B * S * len(state.caches)

    def cached_increment(
        self,
        x_bMD: torch.Tensor,
        pos_bM: torch.Tensor,
        cache: KVCache,
        counts: list[int],
        rows: list[int] | None = None,
        ffn_bM: torch.Tensor | None = None,
        router_x_ND: torch.Tensor | None = None,
        read_only: bool = False,
    ) -> torch.Tensor:
        """The residual increment of new rows, attending over (and filling) ``cache``.

        Sequence i brings its first ``counts[i]`` rows; ``rows``: the cache's sequences
        these b are (None: all of them, in order). ``ffn_bM`` marks the rows that reach the
        FFN (None: all); the others get the attention increment alone. ``router_x_ND`` is
        what a block-input MoE router reads (None: the FFN input). MoE decodes dropless.
        ``read_only``: the rows' keys are in ``cache`` already (a recursion over the first
        one's cache): only their queries are projected, nothing is written.
        """
        n_bMD = self.norm_attn(x_bMD)
        mask_bML: torch.Tensor | None
        if read_only:
            q_bHMd = self.attn.q(n_bMD, pos_bM)
            keys_bGLd, values_bGLd, mask_bML = cache.visible(pos_bM, rows)
        else:
            q_bHMd, k_bGMd, v_bGMd = self.attn.heads(n_bMD, pos_bM)
            keys_bGLd, values_bGLd, mask_bML = cache.append(k_bGMd, v_bGMd, counts, rows, pos_bM)
        a_bMD = self.attn.attend(q_bHMd, keys_bGLd, values_bGLd, mask_bML)
        h_bMD = self.norm_ffn(x_bMD + a_bMD)
        h_ND = h_bMD.reshape(-1, h_bMD.shape[-1]) if ffn_bM is None else h_bMD[ffn_bM]
        if isinstance(self.ffn, MoELayer):
            logits_NE = self.ffn.router_logits(h_ND if router_x_ND is None else router_x_ND)
            f_ND = self.ffn.dropless_local(h_ND, logits_NE)
        else:
            f_ND = self.ffn(h_ND)
        if ffn_bM is None:
            return a_bMD + f_ND.view_as(h_bMD)
        return a_bMD + torch.zeros_like(h_bMD).index_put((ffn_bM,), f_ND)

    def cached_step(
        self,
        x_BSD: torch.Tensor,
        pos_BS: torch.Tensor,
        state: LayerState,
        cache: KVCache,
        keys_BS: torch.Tensor | None = None,
        work_BS: torch.Tensor | None = None,
        g_BS: torch.Tensor | None = None,
        block_input: bool = False,
        increment: Increment | None = None,
    ) -> torch.Tensor:
        """The block on some positions only: ``x + g * increment`` at ``work_BS``, else ``x``.

        ``keys_BS``: the positions whose keys/values enter ``cache`` (None: all); the
        others do no work and write nothing (a MoD skip, a halted ponder token).
        ``work_BS`` (within the keys; None: every key) get the increment; a key outside it
        (an exited token) only writes its K/V, and does nothing else unless its sequence
        has work in the same call (a prefill), where its query rides along and is
        discarded. Sequences with no work run no queries, FFN or router at all.
        ``g_BS`` scales the increments (None: 1); ``block_input``: the MoE router reads
        the block input. ``increment`` replaces :meth:`cached_increment` over ``cache``
        on the compacted rows (a recursion block runs its whole group there); the
        selection of rows, the gate and the counters stay this method's. Counts into
        ``state``: processed (work), skipped (no key) and propagated (key only) token-blocks.
        """
        B, S, _ = x_BSD.shape
        keys = [S] * B if keys_BS is None else keys_BS.sum(1).tolist()  # a host sync: shapes
        work = keys if work_BS is None else work_BS.sum(1).tolist()
        state.processed += sum(work)
        state.skipped += B * S - sum(keys)
        state.propagated += sum(keys) - sum(work)
        if keys_BS is None:
            keys_BS = torch.ones(B, S, dtype=torch.bool, device=x_BSD.device)
        kv_only = [i for i in range(B) if work[i] == 0 < keys[i]]
        if kv_only:
            self._kv_rows(x_BSD, pos_BS, keys_BS, [keys[i] for i in kv_only], kv_only, cache)
        rows = [i for i in range(B) if work[i] > 0]
        if not rows:
            return x_BSD
        if increment is None:
            increment = partial(_over_cache, self, cache)
        if len(rows) == B:
            return _rows(x_BSD, pos_BS, keys_BS, work_BS, g_BS, keys, None, block_input, increment)
        # Only the sequences with work run the block: the others do no work in it.
        rows_b = torch.tensor(rows, dtype=torch.long, device=x_BSD.device)

        def sub(t_BS: torch.Tensor | None) -> torch.Tensor | None:
            return None if t_BS is None else t_BS.index_select(0, rows_b)

        new_bSD = _rows(
            x_BSD.index_select(0, rows_b),
            pos_BS.index_select(0, rows_b),
            keys_BS.index_select(0, rows_b),
            sub(work_BS),
            sub(g_BS),
            [keys[i] for i in rows],
            rows,
            block_input,
            increment,
        )
        return x_BSD.index_copy(0, rows_b, new_bSD)

    def _kv_rows(
        self,
        x_BSD: torch.Tensor,
        pos_BS: torch.Tensor,
        keys_BS: torch.Tensor,
        counts: list[int],
        rows: list[int],
        cache: KVCache,
    ) -> None:
        """Sequences ``rows`` write only the K/V of their key rows (no query, no FFN)."""
        every = len(rows) == x_BSD.shape[0]
        if not every:
            rows_b = torch.tensor(rows, dtype=torch.long, device=x_BSD.device)
            x_BSD, pos_BS = x_BSD.index_select(0, rows_b), pos_BS.index_select(0, rows_b)
            keys_BS = keys_BS.index_select(0, rows_b)
        idx_bM, _ = _compacted(keys_BS, counts)
        x_bMD = x_BSD.gather(1, idx_bM.unsqueeze(-1).expand(-1, -1, x_BSD.shape[-1]))
        k_bGMd, v_bGMd = self.attn.kv(self.norm_attn(x_bMD), pos_BS.gather(1, idx_bM))
        cache.append(k_bGMd, v_bGMd, counts, None if every else rows)


def _rows(
    x_bSD: torch.Tensor,
    pos_bS: torch.Tensor,
    keys_bS: torch.Tensor,
    work_bS: torch.Tensor | None,
    g_bS: torch.Tensor | None,
    counts: list[int],
    rows: list[int] | None,
    block_input: bool,
    increment: Increment,
) -> torch.Tensor:
    """The block on sequences ``rows`` (None: all), each with work, over its key rows."""
    b, _, D = x_bSD.shape
    idx_bM, valid_bM = _compacted(keys_bS, counts)
    # Padded rows point at positions outside the keys, so outside the work, too.
    ffn_bM = valid_bM if work_bS is None else work_bS.gather(1, idx_bM)
    M = idx_bM.shape[1]
    idx_bMD = idx_bM.unsqueeze(-1).expand(b, M, D)
    x_bMD = x_bSD.gather(1, idx_bMD)
    router_x_ND = None
    if block_input:
        router_x_ND = x_bMD.reshape(b * M, D) if ffn_bM is None else x_bMD[ffn_bM]
    delta_bMD = increment(x_bMD, pos_bS.gather(1, idx_bM), counts, rows, ffn_bM, router_x_ND)
    if g_bS is not None:
        delta_bMD = g_bS.gather(1, idx_bM).unsqueeze(-1).to(x_bSD.dtype) * delta_bMD
    new_bMD = x_bMD + delta_bMD
    if ffn_bM is not None:
        new_bMD = torch.where(ffn_bM.unsqueeze(-1), new_bMD, x_bMD)
    return x_bSD.scatter(1, idx_bMD, new_bMD)


def _over_cache(
    block: Block,
    cache: KVCache,
    x_bMD: torch.Tensor,
    pos_bM: torch.Tensor,
    counts: list[int],
    rows: list[int] | None,
    ffn_bM: torch.Tensor | None,
    router_x_ND: torch.Tensor | None,
) -> torch.Tensor:
    """The default :data:`Increment`: the block's own over its cache."""
    return block.cached_increment(x_bMD, pos_bM, cache, counts, rows, ffn_bM, router_x_ND)


def keys_and_work(
    run_BS: torch.Tensor, exited_BS: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Early exit's rule for a block that runs the positions ``run_BS``: an exited token is
    a key (its K/V enter the cache) and does no work. ``(keys_BS, work_BS)``; ``work_BS``
    is None when nothing has exited (every key works)."""
    if exited_BS is None:
        return run_BS, None
    return run_BS | exited_BS, run_BS & ~exited_BS


def keys_mask(keys_BS: torch.Tensor) -> torch.Tensor:
    """The masked-dense attention mask ``[B, S, S]``: a query sees the earlier keys (and
    itself) among ``keys_BS``; the diagonal is always on, so a row outside the keys stays
    finite (its output is discarded)."""
    S = keys_BS.shape[1]
    causal_SS = torch.ones(S, S, dtype=torch.bool, device=keys_BS.device).tril()
    eye_SS = torch.eye(S, dtype=torch.bool, device=keys_BS.device)
    return (causal_SS & keys_BS.unsqueeze(1)) | eye_SS


def _compacted(
    keys_bS: torch.Tensor, counts: list[int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``idx_bM``: each sequence's key positions first, in position order (a stable sort of
    "not a key"), M = max(counts); ``valid_bM``: its real rows (None: all are)."""
    M = max(counts)
    idx_bM = torch.sort((~keys_bS).to(torch.uint8), dim=1, stable=True).indices[:, :M]
    if min(counts) == M:
        return idx_bM, None
    counts_b = torch.tensor(counts, device=keys_bS.device)
    return idx_bM, torch.arange(M, device=keys_bS.device).unsqueeze(0) < counts_b.unsqueeze(1)
