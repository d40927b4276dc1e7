"""Child-Sum Tree-LSTM over syntax trees, batched by level to static shapes.

Shape legend: B trees, N nodes of the batch, D width, L label tokens per node, P nodes of
one level (padded), Q child edges into one level (padded), T node types, V tokens.

The cell (Tai, Socher and Manning 2015, Child-Sum) of node j with input x_j and children
C(j)::

    hsum_j = sum_{k in C(j)} h_k
    i_j = sigmoid(W_i x_j + U_i hsum_j + b_i)    o_j, u_j (tanh) alike
    f_jk = sigmoid(W_f x_j + U_f h_k + b_f)       one forget gate per child
    c_j = i_j * u_j + sum_k f_jk * c_k
    h_j = o_j * tanh(c_j)

A node's input is its type's embedding plus the mean of its label's token embeddings
(none for an unlabelled node). A node runs once all its children have: the **level** of
a node is its height (0 for a leaf, 1 + the highest child), so every node of a level has
its children at lower levels. :func:`tree_batch` lays a batch out level by level, as
DGL's topological frontiers do: level h is one step for the nodes of height h of every
tree at once (their inputs gathered, their children's states gathered and summed by an
``index_add`` into per-node slots, the gates of all of them in one GEMM each), not one
node at a time. Each level's node and edge lists are padded up to a power-of-two
**bucket** (:func:`turnout.models.nodes.bucket`) with a scratch row, so a step's shapes come
from a small fixed set whatever the trees. :func:`reference_encode` runs the cell one
node at a time in post-order: the oracle the tests hold the batched encoder to.

The encoder's output is every node's ``h``; ``TreeBatch.roots_B`` picks each tree's root.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from turnout.models.nodes import NodeEmbedding, bucket


@dataclass
class Level:
    """One level's step: its nodes, and the child edges into them."""

    nodes_P: torch.Tensor
    """Batch indices of the level's nodes; padding points at the scratch row N."""
    child_Q: torch.Tensor
    """Batch index of each child edge's child; padding points at N."""
    slot_Q: torch.Tensor
    """Position of each edge's parent in ``nodes_P``; padding points at P (a scratch slot)."""


@dataclass
class TreeBatch:
    types_N: torch.Tensor
    """Node type ids."""
    tokens_NL: torch.Tensor
    """Label token ids, -1 for padding."""
    parent_N: torch.Tensor
    """Batch index of each node's parent, -1 for a root."""
    roots_B: torch.Tensor
    """Batch index of each tree's root."""
    graph_N: torch.Tensor
    """Which tree each node belongs to."""
    levels: list[Level]
    """Bottom-up: level 0 (the leaves) first."""

    @property
    def num_nodes(self) -> int:
        return int(self.types_N.shape[0])


def tree_batch(
    trees: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    pad: bool = True,
) -> TreeBatch:
    """A batch of trees, each ``(types_N, tokens_NL, parent_N, height_N)`` with in-tree
    indices (root first, parent -1), laid out by level. ``pad=False`` keeps every list at
    its real size (the shapes then follow the data)."""
    offsets = np.cumsum([0, *(len(t[0]) for t in trees)])
    N = int(offsets[-1])
    types = np.concatenate([t[0] for t in trees]).astype(np.int64)
    tokens = np.concatenate([t[1] for t in trees]).astype(np.int64)
    parent = np.concatenate(
        [np.where(t[2] >= 0, t[2] + off, -1) for t, off in zip(trees, offsets, strict=False)]
    ).astype(np.int64)
    height = np.concatenate([t[3] for t in trees]).astype(np.int64)
    H = int(height.max()) if N else -1
    # Nodes level by level (batch order within a level, as the lists are kept), each
    # node's position within its level, and the child edges grouped by their parent's level.
    order = np.argsort(height, kind="stable")
    starts = np.searchsorted(height[order], np.arange(H + 2))
    slot_of = np.empty(N, np.int64)
    slot_of[order] = np.arange(N) - starts[height[order]]
    kids = np.flatnonzero(parent >= 0)
    kids = kids[np.argsort(height[parent[kids]], kind="stable")]
    kid_starts = np.searchsorted(height[parent[kids]], np.arange(H + 2))
    levels = []
    for h in range(H + 1):
        nodes = order[starts[h] : starts[h + 1]]
        child = kids[kid_starts[h] : kid_starts[h + 1]]
        slot = slot_of[parent[child]]
        P = bucket(len(nodes)) if pad else len(nodes)
        Q = bucket(len(child)) if pad else len(child)
        levels.append(
            Level(
                torch.from_numpy(np.pad(nodes, (0, P - len(nodes)), constant_values=N)),
                torch.from_numpy(np.pad(child, (0, Q - len(child)), constant_values=N)),
                torch.from_numpy(np.pad(slot, (0, Q - len(slot)), constant_values=P)),
            )
        )
    return TreeBatch(
        torch.from_numpy(types),
        torch.from_numpy(tokens),
        torch.from_numpy(parent),
        torch.from_numpy(offsets[:-1].astype(np.int64)),
        torch.from_numpy(np.repeat(np.arange(len(trees)), np.diff(offsets))),
        levels,
    )


class TreeLSTM(nn.Module):
    """Child-Sum Tree-LSTM encoder (see the module docstring)."""

    def __init__(self, num_types: int, vocab_size: int, d_model: int, init_std: float = 0.02):
        super().__init__()
        D = d_model
        self.d_model = D
        self.embed = NodeEmbedding(num_types, vocab_size, D, init_std)
        self.W_iouf = nn.Linear(D, 4 * D)  # input -> i, o, u, f (with the biases)
        self.U_iou = nn.Linear(D, 3 * D, bias=False)  # children's summed h -> i, o, u
        self.U_f = nn.Linear(D, D, bias=False)  # one child's h -> its forget gate
        for m in (self.W_iouf, self.U_iou, self.U_f):
            nn.init.normal_(m.weight, std=init_std)
        nn.init.zeros_(self.W_iouf.bias)
        with torch.no_grad():
            self.W_iouf.bias[3 * D :] = 1.0  # forget gates start open, as LSTMs usually do

    def forward(self, batch: TreeBatch) -> torch.Tensor:
        """``h_ND`` of every node, level by level."""
        D = self.d_model
        x_ND = self.embed(batch.types_N, batch.tokens_NL)
        N = x_ND.shape[0]
        # Every node's input projection at once, with a zero scratch row N for padding.
        wx_MG = torch.cat([self.W_iouf(x_ND), x_ND.new_zeros(1, 4 * D)])
        h_MD = x_ND.new_zeros(N + 1, D)
        c_MD = x_ND.new_zeros(N + 1, D)
        for lv in batch.levels:
            P = lv.nodes_P.shape[0]
            wx_PG = wx_MG[lv.nodes_P]
            iou_P3 = wx_PG[:, : 3 * D]
            if lv.child_Q.numel():
                hk_QD, ck_QD = h_MD[lv.child_Q], c_MD[lv.child_Q]
                hsum_PD = x_ND.new_zeros(P + 1, D).index_add(0, lv.slot_Q, hk_QD)[:P]
                wx_ext = torch.cat([wx_PG[:, 3 * D :], x_ND.new_zeros(1, D)])
                f_QD = torch.sigmoid(wx_ext[lv.slot_Q] + self.U_f(hk_QD))
                fc_PD = x_ND.new_zeros(P + 1, D).index_add(0, lv.slot_Q, f_QD * ck_QD)[:P]
                iou_P3 = iou_P3 + self.U_iou(hsum_PD)
            else:
                fc_PD = x_ND.new_zeros(P, D)
            i_PD, o_PD, u_PD = iou_P3.split(D, dim=-1)
            c_new = torch.sigmoid(i_PD) * torch.tanh(u_PD) + fc_PD
            h_new = torch.sigmoid(o_PD) * torch.tanh(c_new)
            # Padded rows write the scratch row N only, which no real node reads.
            c_MD = c_MD.index_copy(0, lv.nodes_P, c_new)
            h_MD = h_MD.index_copy(0, lv.nodes_P, h_new)
        return h_MD[:N]


def reference_encode(model: TreeLSTM, batch: TreeBatch) -> torch.Tensor:
    """``h_ND`` computed one node at a time, children before parents (the oracle)."""
    D = model.d_model
    x_ND = model.embed(batch.types_N, batch.tokens_NL)
    N = x_ND.shape[0]
    parent = batch.parent_N.tolist()
    children: list[list[int]] = [[] for _ in range(N)]
    for j, p in enumerate(parent):
        if p >= 0:
            children[p].append(j)
    h: list[torch.Tensor | None] = [None] * N
    c: list[torch.Tensor | None] = [None] * N
    order: list[int] = []
    for root in batch.roots_B.tolist():  # iterative post-order
        stack = [(root, False)]
        while stack:
            j, done = stack.pop()
            if done:
                order.append(j)
                continue
            stack.append((j, True))
            stack.extend((k, False) for k in reversed(children[j]))
    W, b = model.W_iouf.weight, model.W_iouf.bias
    for j in order:
        wx = x_ND[j] @ W.t() + b
        hsum = x_ND.new_zeros(D)
        fc = x_ND.new_zeros(D)
        for k in children[j]:
            hk, ck = h[k], c[k]
            assert hk is not None and ck is not None
            hsum = hsum + hk
            f = torch.sigmoid(wx[3 * D :] + hk @ model.U_f.weight.t())
            fc = fc + f * ck
        iou = wx[: 3 * D] + hsum @ model.U_iou.weight.t()
        i, o, u = iou.split(D)
        cj = torch.sigmoid(i) * torch.tanh(u) + fc
        c[j], h[j] = cj, torch.sigmoid(o) * torch.tanh(cj)
    out = [h[j] for j in range(N)]
    return torch.stack([t for t in out if t is not None])
