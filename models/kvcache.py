"""A key/value cache for one attention layer, with a length per sequence.

Shape legend: B batch, b the sequences of one append (all B, or a subset ``rows``), G
key/value heads, Hd head dim, L cache slots, M new rows per sequence in one append
(padded: sequence i brings ``counts[i] <= M`` real rows).

Sequences of a batch may hold different numbers of cached tokens (a Mixture-of-Depths
block caches only the tokens it processed), so the buffer is padded to ``L`` slots and
each sequence has its own length; :meth:`KVCache.append` returns the boolean key mask
that hides the slots a query may not see. :class:`LayerState` is one block's decode state
(its caches and work counters), which the block's own ``decode_step`` fills.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

Tensor = torch.Tensor


class KVCache:
    """Padded ``[B, G, L, Hd]`` keys and values; slot ``< lengths[b]`` holds sequence b's."""

    def __init__(
        self,
        batch: int,
        n_kv_heads: int,
        head_dim: int,
        slots: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        # Zeros, not empty: a padded query may read an unwritten slot (its output is discarded,
        # but it must stay finite).
        self.k_BGLd = torch.zeros(batch, n_kv_heads, slots, head_dim, device=device, dtype=dtype)
        self.v_BGLd = torch.zeros_like(self.k_BGLd)
        self.lengths: list[int] = [0] * batch
        """Cached tokens per sequence (host copy; it decides shapes without a device sync)."""
        self.lengths_B = torch.zeros(batch, dtype=torch.long, device=device)
        self.pos_BL = torch.zeros(batch, slots, dtype=torch.long, device=device)
        """The RoPE position of each slot's token (what :meth:`visible` masks by)."""

    @property
    def slots(self) -> int:
        return self.k_BGLd.shape[2]

    def keys(self, b: int) -> tuple[Tensor, Tensor]:
        """Sequence b's cached keys and values, ``[G, lengths[b], Hd]`` each."""
        n = self.lengths[b]
        return self.k_BGLd[b, :, :n], self.v_BGLd[b, :, :n]

    def append(
        self,
        k_bGMd: Tensor,
        v_bGMd: Tensor,
        counts: list[int],
        rows: list[int] | None = None,
        pos_bM: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Write the first ``counts[i]`` rows of sequence ``rows[i]`` after its cached ones.

        ``pos_bM``: the rows' positions, recorded per slot for :meth:`visible` (None: not
        recorded; only a cache that :meth:`visible` reads needs them).

        ``rows`` are the batch indices of the sequences in this append (None: all B, in
        order); the other sequences' caches are untouched. Returns the keys and values
        to attend over, ``[b, G, L', Hd]`` with ``L'`` the longest new length among
        ``rows``, and the mask ``[b, M, L']`` (True = may attend): new row j of sequence
        i sees that sequence's earlier cache and new rows ``0..j``. Padded rows
        (``j >= counts[i]``) see at least slot 0, so they stay finite. The mask is None
        when every row may see every returned slot.
        """
        b, _, M, _ = k_bGMd.shape
        device = self.lengths_B.device
        every = rows is None
        idx = list(range(len(self.lengths))) if rows is None else rows
        if len(idx) != b or len(counts) != b:
            raise ValueError(f"{b} sequences of keys for {len(idx)} rows and {len(counts)} counts")
        old = [self.lengths[r] for r in idx]
        new = [n + c for n, c in zip(old, counts, strict=True)]
        if max(new) > self.slots:
            raise ValueError(f"KV cache overflow: {max(new)} tokens for {self.slots} slots")
        rows_b = None if every else torch.tensor(idx, dtype=torch.long, device=device)
        old_b = self.lengths_B if rows_b is None else self.lengths_B[rows_b]
        counts_b = torch.tensor(counts, dtype=torch.long, device=device)
        uniform = len(set(old)) == 1 and all(c == M for c in counts)
        if uniform:
            at = slice(old[0], old[0] + M)
            if rows_b is None:
                self.k_BGLd[:, :, at] = k_bGMd
                self.v_BGLd[:, :, at] = v_bGMd
                if pos_bM is not None:
                    self.pos_BL[:, at] = pos_bM
            else:
                self.k_BGLd[rows_b, :, at] = k_bGMd
                self.v_BGLd[rows_b, :, at] = v_bGMd
                if pos_bM is not None:
                    self.pos_BL[rows_b, at] = pos_bM
        else:
            j_M = torch.arange(M, device=device)
            i_N, j_N = (j_M.unsqueeze(0) < counts_b.unsqueeze(1)).nonzero(as_tuple=True)
            seq_N = i_N if rows_b is None else rows_b[i_N]
            slot_N = old_b[i_N] + j_N
            self.k_BGLd[seq_N, :, slot_N] = k_bGMd[i_N, :, j_N]
            self.v_BGLd[seq_N, :, slot_N] = v_bGMd[i_N, :, j_N]
            if pos_bM is not None:
                self.pos_BL[seq_N, slot_N] = pos_bM[i_N, j_N]
        for r, n in zip(idx, new, strict=True):
            self.lengths[r] = n
        if rows_b is None:
            self.lengths_B = old_b + counts_b
        else:
            self.lengths_B = self.lengths_B.index_add(0, rows_b, counts_b)
        L = max(new)
        if rows_b is None:
            keys_bGLd, values_bGLd = self.k_BGLd[:, :, :L], self.v_BGLd[:, :, :L]
        else:
            keys_bGLd = self.k_BGLd[rows_b, :, :L]
            values_bGLd = self.v_BGLd[rows_b, :, :L]
        if uniform and M == 1:
            return keys_bGLd, values_bGLd, None
        j_M = torch.arange(M, device=device)
        visible_bM = old_b.unsqueeze(1) + j_M.unsqueeze(0) + 1
        slot_L = torch.arange(L, device=device)
        mask_bML = slot_L.view(1, 1, L) < visible_bM.unsqueeze(-1)
        return keys_bGLd, values_bGLd, mask_bML

    def visible(
        self, pos_bM: Tensor, rows: list[int] | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Read without writing: the keys and values of sequences ``rows`` (None: all) and
        the mask ``[b, M, L']`` of the slots holding positions at or before each query's
        ``pos_bM`` (slot 0 always, so a padded query stays finite). For queries whose own
        keys an earlier call or step already appended (``append`` with ``pos_bM``)."""
        idx = list(range(len(self.lengths))) if rows is None else rows
        L = max(max(self.lengths[r] for r in idx), 1)
        if rows is None:
            keys_bGLd, values_bGLd = self.k_BGLd[:, :, :L], self.v_BGLd[:, :, :L]
            pos_bL, len_b = self.pos_BL[:, :L], self.lengths_B
        else:
            rows_b = torch.tensor(rows, dtype=torch.long, device=self.lengths_B.device)
            keys_bGLd, values_bGLd = self.k_BGLd[rows_b, :, :L], self.v_BGLd[rows_b, :, :L]
            pos_bL, len_b = self.pos_BL[rows_b, :L], self.lengths_B[rows_b]
        slot_L = torch.arange(L, device=pos_bL.device)
        written_bL = slot_L.unsqueeze(0) < len_b.unsqueeze(1)
        mask_bML = (written_bL.unsqueeze(1) & (pos_bL.unsqueeze(1) <= pos_bM.unsqueeze(2))) | (
            slot_L == 0
        )
        return keys_bGLd, values_bGLd, mask_bML


@dataclass
class LayerState:
    """One block's caches and its work counters (token-blocks, summed over sequences)."""

    cache: KVCache
    routed: bool = False
    """A MoD-routed block (mod, mode): the predictor decides which tokens run."""
    processed: int = 0
    skipped: int = 0
    more: list[KVCache] = field(default_factory=list)
    """A ponder block's caches of applications 2..N (``cache`` is application 1's); a
    recursion block's other caches (see :class:`~turnout.models.recursion.RecursionBlock`)."""
    propagated: int = 0
    """Token-blocks whose K/V came from a propagated exit state (early exit)."""
    steps_BS: Tensor | None = None
    """A ponder or recursion block: the block applications each position of the last
    call took (a recursion block: recursions times its group's blocks)."""

    @property
    def caches(self) -> list[KVCache]:
        """Every cache of the block, application order (one unless it is a ponder block)."""
        return [self.cache, *self.more]
