"""A key/value cache for one attention layer, with a length per sequence.

Shape legend: B batch, G key/value heads, Hd head dim, L cache slots, M new rows per
sequence in one append (padded: sequence b brings ``counts[b] <= M`` real rows).

Sequences of a batch may hold different numbers of cached tokens (a Mixture-of-Depths
block caches only the tokens it processed), so the buffer is padded to ``L`` slots and
each sequence has its own length; :meth:`KVCache.append` returns the boolean key mask
that hides the slots a query may not see.
"""

from __future__ import annotations

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

    @property
    def slots(self) -> int:
        return self.k_BGLd.shape[2]

    def keys(self, b: int) -> tuple[Tensor, Tensor]:
        """Sequence b's cached keys and values, ``[G, lengths[b], Hd]`` each."""
        n = self.lengths[b]
        return self.k_BGLd[b, :, :n], self.v_BGLd[b, :, :n]

    def append(
        self, k_BGMd: Tensor, v_BGMd: Tensor, counts: list[int]
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Write the first ``counts[b]`` rows of sequence b after its cached ones.

        Returns the keys and values to attend over, ``[B, G, L', Hd]`` with ``L'`` the
        longest new length, and the mask ``[B, M, L']`` (True = may attend): new row j
        of sequence b sees its sequence's earlier cache and new rows ``0..j``. Padded
        rows (``j >= counts[b]``) see at least slot 0, so they stay finite. The mask is
        None when every row may see every returned slot.
        """
        B, _, M, _ = k_BGMd.shape
        new = [n + c for n, c in zip(self.lengths, counts, strict=True)]
        if max(new) > self.slots:
            raise ValueError(f"KV cache overflow: {max(new)} tokens for {self.slots} slots")
        old_B = self.lengths_B
        counts_B = torch.tensor(counts, dtype=torch.long, device=old_B.device)
        uniform = len(set(self.lengths)) == 1 and all(c == M for c in counts)
        if uniform:
            start = self.lengths[0]
            self.k_BGLd[:, :, start : start + M] = k_BGMd
            self.v_BGLd[:, :, start : start + M] = v_BGMd
        else:
            j_M = torch.arange(M, device=old_B.device)
            b_N, j_N = (j_M.unsqueeze(0) < counts_B.unsqueeze(1)).nonzero(as_tuple=True)
            slot_N = old_B[b_N] + j_N
            self.k_BGLd[b_N, :, slot_N] = k_BGMd[b_N, :, j_N]
            self.v_BGLd[b_N, :, slot_N] = v_BGMd[b_N, :, j_N]
        self.lengths = new
        self.lengths_B = old_B + counts_B
        L = max(new)
        keys_BGLd, values_BGLd = self.k_BGLd[:, :, :L], self.v_BGLd[:, :, :L]
        if uniform and M == 1:
            return keys_BGLd, values_BGLd, None
        j_M = torch.arange(M, device=old_B.device)
        visible_BM = old_B.unsqueeze(1) + j_M.unsqueeze(0) + 1
        slot_L = torch.arange(L, device=old_B.device)
        mask_BML = slot_L.view(1, 1, L) < visible_BM.unsqueeze(-1)
        return keys_BGLd, values_BGLd, mask_BML
