"""What the structure-following encoders share: list buckets and a node's input vector.

Shape legend: N nodes, L label tokens per node, D width.

A node's input is its type's embedding plus the mean embedding of its label's tokens
(``-1`` marks an unused token slot; an unlabelled node has none and gets its type's
embedding alone). Node and edge lists are padded to :func:`bucket` sizes, so a step's
shapes come from a small fixed set whatever the data.
"""

from __future__ import annotations

import torch
from torch import nn

MIN_BUCKET = 8
"""The smallest padded size of a node or edge list."""


def bucket(n: int) -> int:
    """``n`` rounded up to a power of two, at least :data:`MIN_BUCKET` (0 stays 0)."""
    return 0 if n == 0 else max(MIN_BUCKET, 1 << (n - 1).bit_length())


class NodeEmbedding(nn.Module):
    """``x_ND`` = type embedding + mean label-token embedding."""

    def __init__(self, num_types: int, vocab_size: int, d_model: int, init_std: float) -> None:
        super().__init__()
        self.type_emb = nn.Embedding(num_types, d_model)
        self.token_emb = nn.Embedding(vocab_size, d_model)
        for m in (self.type_emb, self.token_emb):
            nn.init.normal_(m.weight, std=init_std)

    def forward(self, types_N: torch.Tensor, tokens_NL: torch.Tensor) -> torch.Tensor:
        real_NL = tokens_NL >= 0
        emb_NLD = self.token_emb(tokens_NL.clamp_min(0)) * real_NL.unsqueeze(-1)
        count_N1 = real_NL.sum(-1, keepdim=True).clamp_min(1)
        return self.type_emb(types_N) + emb_NLD.sum(1) / count_N1
