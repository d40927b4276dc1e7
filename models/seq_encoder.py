"""The structure-free baseline: bidirectional attention over a function's nodes in order.

Shape legend: B functions, N real nodes of the batch, Nm the most nodes of one function,
D width, H heads, Dh head width, F FFN width.

The function-name task's third encoder reads the same inputs as the Tree-LSTM and the
graph network (each node's type and label tokens, :class:`~turnout.models.nodes.NodeEmbedding`)
but none of the edges: a function's nodes in preorder, which is its source in reading
order with the node kinds between the tokens, go through ``layers`` pre-norm transformer
layers with a learned position per node and attention masked to the function. So it is a
transformer over the linearised function, and what it lacks against the other two is the
structure alone. The FFN is a SwiGLU or, with ``moe``, turnout's MoE layer, run on the
real nodes only (padding rows skip it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from turnout.config.model import MoEConfig
from turnout.models.gnn import GraphBatch
from turnout.models.layers import RMSNorm, SwiGLU
from turnout.models.moe import MoEAux, MoELayer
from turnout.models.nodes import NodeEmbedding

Layout = tuple[torch.Tensor, torch.Tensor, int]
"""``(pos_N, real_BN, Nm)``: a batch's functions laid out as ``[B, Nm]`` rows."""


def padded_layout(graph_N: torch.Tensor, roots_B: torch.Tensor) -> Layout:
    """Each real node's position in its function (``pos_N``), the ``[B, Nm]`` mask of real
    slots, and ``Nm``: the layout the attention encoder and the name decoder share."""
    pos_N = torch.arange(graph_N.shape[0], device=graph_N.device) - roots_B[graph_N]
    Nm = int(pos_N.max()) + 1
    real_BN = torch.zeros(roots_B.shape[0], Nm, dtype=torch.bool, device=graph_N.device)
    real_BN[graph_N, pos_N] = True
    return pos_N, real_BN, Nm


class SeqLayer(nn.Module):
    def __init__(
        self, d_model: int, n_heads: int, ffn_dim: int, moe: MoEConfig | None, eps: float
    ) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not a multiple of n_heads {n_heads}")
        self.heads = n_heads
        self.norm1 = RMSNorm(d_model, eps)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.norm2 = RMSNorm(d_model, eps)
        self.ffn: nn.Module = (
            MoELayer(d_model, ffn_dim, moe) if moe is not None else SwiGLU(d_model, ffn_dim)
        )

    def forward(
        self, h_BND: torch.Tensor, real_BN: torch.Tensor, at: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, MoEAux | None]:
        B, Nm, D = h_BND.shape
        q, k, v = self.qkv(self.norm1(h_BND)).view(B, Nm, 3, self.heads, -1).unbind(2)
        mask_B11N = real_BN[:, None, None, :]
        o_BHND = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask_B11N
        )
        h_BND = h_BND + self.out(o_BHND.transpose(1, 2).reshape(B, Nm, D))
        x_ND = self.norm2(h_BND[at])  # the real nodes only
        aux = None
        if isinstance(self.ffn, MoELayer):
            y_ND, aux = self.ffn(x_ND)
        else:
            y_ND = self.ffn(x_ND)
        return h_BND.index_put(at, y_ND, accumulate=True), aux


class SeqEncoder(nn.Module):
    """Node inputs plus a learned position, then ``layers`` attention layers."""

    def __init__(
        self,
        num_types: int,
        vocab_size: int,
        d_model: int,
        ffn_dim: int,
        layers: int,
        n_heads: int,
        max_nodes: int,
        moe: MoEConfig | None = None,
        init_std: float = 0.02,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.embed = NodeEmbedding(num_types, vocab_size, d_model, init_std)
        self.pos_emb = nn.Embedding(max_nodes, d_model)
        self.layers = nn.ModuleList(
            SeqLayer(d_model, n_heads, ffn_dim, moe, eps) for _ in range(layers)
        )
        self.norm = RMSNorm(d_model, eps)
        nn.init.normal_(self.pos_emb.weight, std=init_std)
        for m in self.layers.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=init_std)

    def forward(
        self, batch: GraphBatch, layout: Layout | None = None
    ) -> tuple[torch.Tensor, list[MoEAux]]:
        """The final node states ``[N, D]`` and each MoE layer's aux (the edges unread);
        ``layout``: the batch's :func:`padded_layout`, when the caller has it."""
        pos_N, real_BN, Nm = layout or padded_layout(batch.graph_N, batch.roots_B)
        if Nm > self.pos_emb.num_embeddings:
            raise ValueError(
                f"a function of {Nm} nodes is longer than the {self.pos_emb.num_embeddings} "
                "positions (data.ast.max_nodes)"
            )
        x_ND = self.embed(batch.types_N, batch.tokens_NL) + self.pos_emb(pos_N)
        at = (batch.graph_N, pos_N)
        h_BND = x_ND.new_zeros(real_BN.shape[0], Nm, x_ND.shape[1]).index_put(at, x_ND)
        auxes = []
        for layer in self.layers:
            h_BND, aux = layer(h_BND, real_BN, at)
            if aux is not None:
                auxes.append(aux)
        return self.norm(h_BND[at]), auxes
