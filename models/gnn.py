"""A message-passing network over typed edge lists, with an optional MoE FFN per node.

Shape legend: N nodes of a batch (real), Np padded, M edges (padded), D width, R relation
types, E experts, L label tokens per node.

A batch of graphs is one disjoint graph: node ``n`` of graph g is row ``offset_g + n``.
Each edge type of the data (``child``, ``next``, ``same``, ``use``) is two relations,
one per direction, so information flows both ways along every edge: ``R = 2 *
edge types``. A layer (pre-norm residual, as a transformer block, with message passing
in the place of attention)::

    a = norm1(h)
    m_v = mean over edges (u -> v, r) of  a_u W_r          # [N, D], 0 without in-edges
    h = h + m O
    h = h + FFN(norm2(h))                                   # SwiGLU, or a MoE layer

The messages are computed without a dense adjacency: ``a @ [W_1 .. W_R]`` once (one
``[Np, D] x [D, R D]`` GEMM), each edge's slice gathered by ``(src, r)``, summed into its
destination with ``index_add`` and divided by the in-degree. Node and edge lists are
padded to power-of-two buckets (:func:`graph_batch`): padded edges run from and into a
scratch node, padded nodes are never a real edge's end, so the padding changes nothing
real. With ``moe`` the FFN is turnout's :class:`~turnout.models.moe.MoELayer` (router,
capacity or dropless, its dispatcher, which expert parallelism replaces like any
other), run on the real nodes only; its aux losses come back per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from turnout.config.model import MoEConfig
from turnout.models.layers import RMSNorm, SwiGLU
from turnout.models.moe import MoEAux, MoELayer
from turnout.models.nodes import NodeEmbedding, bucket


@dataclass
class GraphBatch:
    types_N: torch.Tensor
    """Node type ids of the real nodes."""
    tokens_NL: torch.Tensor
    """Label token ids, -1 for padding."""
    src_M: torch.Tensor
    dst_M: torch.Tensor
    rel_M: torch.Tensor
    """Each (padded) edge's source, destination and relation; padding: scratch node Np - 1."""
    roots_B: torch.Tensor
    """Row of each graph's first node (its root)."""
    graph_N: torch.Tensor
    """Which graph each real node belongs to."""
    padded_nodes: int
    """Np: the node rows the layers run on (the real ones first, then padding)."""
    degree_P: torch.Tensor
    """In-edges of each node row, padded edges included (they all enter the scratch row):
    counted once per batch, as integers, for every layer's mean."""

    @property
    def num_nodes(self) -> int:
        return int(self.types_N.shape[0])


def graph_batch(
    graphs: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
    edge_types: int,
    pad: bool = True,
) -> GraphBatch:
    """A batch of graphs, each ``(types_N, tokens_NL, edges_M3)`` with in-graph indices
    and edge rows ``(src, dst, type)``; both directions of every edge become relations
    ``type`` and ``edge_types + type``."""
    offsets = np.cumsum([0, *(len(g[0]) for g in graphs)])
    N = int(offsets[-1])
    src, dst, rel = [], [], []
    for (_, _, e), off in zip(graphs, offsets, strict=False):
        e = np.asarray(e, np.int64).reshape(-1, 3)
        src += [e[:, 0] + off, e[:, 1] + off]
        dst += [e[:, 1] + off, e[:, 0] + off]
        rel += [e[:, 2], e[:, 2] + edge_types]
    s, d, r = (np.concatenate(x) if x else np.zeros(0, np.int64) for x in (src, dst, rel))
    # One scratch row past the real nodes, whatever the padding, for the padded edges.
    Np = bucket(N + 1) if pad else N + 1
    M = bucket(len(s)) if pad else len(s)
    fill = Np - 1
    d = np.pad(d, (0, M - len(d)), constant_values=fill)
    return GraphBatch(
        torch.from_numpy(np.concatenate([g[0] for g in graphs]).astype(np.int64)),
        torch.from_numpy(np.concatenate([g[1] for g in graphs]).astype(np.int64)),
        torch.from_numpy(np.pad(s, (0, M - len(s)), constant_values=fill)),
        torch.from_numpy(d),
        torch.from_numpy(np.pad(r, (0, M - len(r)), constant_values=0)),
        torch.from_numpy(offsets[:-1].astype(np.int64)),
        torch.from_numpy(np.repeat(np.arange(len(graphs)), np.diff(offsets))),
        Np,
        torch.from_numpy(np.bincount(d, minlength=Np).astype(np.int64)),
    )


class GraphLayer(nn.Module):
    def __init__(
        self, d_model: int, ffn_dim: int, relations: int, moe: MoEConfig | None, eps: float
    ) -> None:
        super().__init__()
        D = d_model
        self.relations = relations
        self.norm1 = RMSNorm(D, eps)
        self.W_DRD = nn.Linear(D, relations * D, bias=False)
        self.out = nn.Linear(D, D, bias=False)
        self.norm2 = RMSNorm(D, eps)
        if moe is not None and (moe.hyper.enabled or moe.uses_bias()):
            # Both need the model around the layer (a shared hypernetwork, the trainer's
            # bias step over a language model's blocks): not wired for graphs.
            raise ValueError(
                "a graph network's MoE FFN takes neither hyper-experts nor bias balancing"
            )
        self.ffn: nn.Module = MoELayer(D, ffn_dim, moe) if moe is not None else SwiGLU(D, ffn_dim)

    def messages(self, a_PD: torch.Tensor, batch: GraphBatch) -> torch.Tensor:
        """``m``: the mean over each node's in-edges of the relation-projected source."""
        P, D = a_PD.shape
        proj_PRD = self.W_DRD(a_PD).view(P, self.relations, D)
        # The sums in fp32 at least (bf16 sums of hundreds of in-edges drift).
        acc = torch.promote_types(a_PD.dtype, torch.float32)
        msg_MD = proj_PRD[batch.src_M, batch.rel_M].to(acc)
        summed_PD = msg_MD.new_zeros(P, D).index_add(0, batch.dst_M, msg_MD)
        degree_P = batch.degree_P.to(acc)
        return (summed_PD / degree_P.clamp_min(1).unsqueeze(-1)).to(a_PD.dtype)

    def forward(self, h_PD: torch.Tensor, batch: GraphBatch) -> tuple[torch.Tensor, MoEAux | None]:
        h_PD = h_PD + self.out(self.messages(self.norm1(h_PD), batch))
        N = batch.num_nodes
        x_ND = self.norm2(h_PD[:N])
        aux = None
        if isinstance(self.ffn, MoELayer):
            y_ND, aux = self.ffn(x_ND)
        else:
            y_ND = self.ffn(x_ND)
        return torch.cat([h_PD[:N] + y_ND, h_PD[N:]]), aux


class GraphNet(nn.Module):
    """Node inputs (type + label tokens), then ``layers`` message-passing layers."""

    def __init__(
        self,
        num_types: int,
        vocab_size: int,
        edge_types: int,
        d_model: int,
        ffn_dim: int,
        layers: int,
        moe: MoEConfig | None = None,
        init_std: float = 0.02,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.edge_types = edge_types
        self.embed = NodeEmbedding(num_types, vocab_size, d_model, init_std)
        rel = 2 * edge_types
        self.layers = nn.ModuleList(
            GraphLayer(d_model, ffn_dim, rel, moe, eps) for _ in range(layers)
        )
        self.norm = RMSNorm(d_model, eps)
        for m in self.layers.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=init_std)

    def forward(self, batch: GraphBatch) -> tuple[torch.Tensor, list[MoEAux]]:
        """The final node states ``[N, D]`` (real nodes) and each MoE layer's aux."""
        x_ND = self.embed(batch.types_N, batch.tokens_NL)
        pad = batch.padded_nodes - x_ND.shape[0]
        h_PD = torch.cat([x_ND, x_ND.new_zeros(pad, x_ND.shape[1])])
        auxes = []
        for layer in self.layers:
            h_PD, aux = layer(h_PD, batch)
            if aux is not None:
                auxes.append(aux)
        return self.norm(h_PD[: batch.num_nodes]), auxes


def dense_messages(layer: GraphLayer, a_ND: torch.Tensor, batch: GraphBatch) -> torch.Tensor:
    """The oracle of :meth:`GraphLayer.messages` for small graphs: one dense adjacency
    matrix per relation, ``m = D^-1 sum_r A_r (a W_r)``, real edges only."""
    N, D = a_ND.shape
    real = (batch.src_M < N) & (batch.dst_M < N)
    src, dst, rel = batch.src_M[real], batch.dst_M[real], batch.rel_M[real]
    W_RDD = layer.W_DRD.weight.view(layer.relations, D, D)  # row block r maps to W_r^T
    out = a_ND.new_zeros(N, D)
    degree = a_ND.new_zeros(N)
    for r in range(layer.relations):
        A_NN = a_ND.new_zeros(N, N)
        sel = rel == r
        A_NN.index_put_(
            (dst[sel], src[sel]), torch.ones_like(dst[sel], dtype=a_ND.dtype), accumulate=True
        )
        out = out + A_NN @ (a_ND @ W_RDD[r].t())
        degree = degree + A_NN.sum(1)
    return out / degree.clamp_min(1).unsqueeze(-1)
