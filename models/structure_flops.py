"""Forward FLOPs of the function-name models on a given batch (pure arithmetic).

Shape legend: B functions, N real nodes, P node rows a graph layer runs on (the real
ones plus padding), Q child edges (N - B, every node but the roots), I inner nodes (those
with children), M directed edges a graph layer gathers (padded), Nm the most nodes of one
function, K name positions, V name classes (subtokens and the end), D width, F FFN width,
R relations, E experts, k top-k.

The convention is :mod:`turnout.models.flops`'s: a ``[m, k] x [k, n]`` matmul costs
``2 m k n``; gathers, ``index_add``, norms, activations and the embedding lookups are not
counted. What runs is counted, padding included where the model computes on it (a graph
layer's padded node rows, the decoder's attention over its padded node layout), so the
count is what ``torch.utils.flop_counter`` sees on the same batch (the tests hold it to
that). A Tree-LSTM's padded level rows are counted from the batch's lists too.

- Tree-LSTM: the input projection on every node ``2 N D 4D``; per level with children,
  the children's summed state ``2 P_h D 3D`` and one forget gate per child edge
  ``2 Q_h D D`` (P_h, Q_h: that level's padded lists).
- Graph layer: the relation projection ``2 P D R D`` and the output ``2 P D D`` on its
  node rows; the FFN on the real nodes: a SwiGLU ``3 * 2 N D F``, or the MoE router
  ``2 N D E`` and ``3 * 2 D Fe`` per kept expert row (dropless: ``k N``; in capacity
  mode the rows the plan kept, which the caller passes).
- Attention layer (the structure-free baseline): on each function's padded ``[Nm, D]``
  layout, q/k/v ``2 B Nm D 3D`` and the output ``2 B Nm D D``, scores and context
  ``2 * 2 B Nm Nm D``; the FFN on the real nodes as above.
- Decoder: keys ``2 N D D``; scores and context ``2 * 2 B K Nm D``; the output layer
  ``2 B K 2D V``.
"""

from __future__ import annotations

from turnout.models.gnn import GraphLayer, GraphNet
from turnout.models.layers import SwiGLU
from turnout.models.moe import MoELayer
from turnout.models.seq_encoder import SeqEncoder
from turnout.models.structure import StructureBatch, StructureModel
from turnout.models.treelstm import TreeLSTM

SWIGLU_MATMULS = 3


def batch_flops(
    model: StructureModel, batch: StructureBatch, kept_rows: list[int] | None = None
) -> float:
    """Forward FLOPs of ``model`` on ``batch``; ``kept_rows``: the expert rows each MoE
    layer kept (None: dropless, ``k`` per real node)."""
    D = int(model.queries_KD.shape[1])
    K = model.max_name
    V = model.end + 1
    N = int(batch.graph_N.shape[0])
    B = batch.size
    Nm = int(batch.graph_N.bincount().max())
    total = 2.0 * N * D * D + 2 * 2 * B * K * Nm * D + 2 * B * K * 2 * D * V
    enc = model.encoder
    if isinstance(enc, TreeLSTM):
        assert batch.tree is not None
        total += 2.0 * N * D * 4 * D
        for lv in batch.tree.levels:
            if lv.child_Q.numel():
                total += 2.0 * lv.nodes_P.numel() * D * 3 * D + 2.0 * lv.child_Q.numel() * D * D
        return total
    assert isinstance(enc, (GraphNet, SeqEncoder)) and batch.graph is not None
    P = batch.graph.padded_nodes
    for i, layer in enumerate(enc.layers):
        if isinstance(layer, GraphLayer):
            total += 2.0 * P * D * layer.relations * D + 2.0 * P * D * D
        else:
            total += 2.0 * B * Nm * D * 4 * D + 2 * 2.0 * B * Nm * Nm * D
        total += _ffn_flops(layer.ffn, N, D, None if kept_rows is None else kept_rows[i])
    return total


def _ffn_flops(ffn: object, N: int, D: int, rows: int | None) -> float:
    """A layer's FFN on ``N`` real nodes: a SwiGLU, or the router and ``rows`` expert
    rows (None: dropless, ``k N``)."""
    if isinstance(ffn, MoELayer):
        E, k = ffn.num_experts, ffn.top_k
        hidden = int(ffn.experts.w_up_EDF.shape[-1])
        rows = k * N if rows is None else rows
        return 2.0 * N * D * E + rows * SWIGLU_MATMULS * 2 * D * hidden
    assert isinstance(ffn, SwiGLU)
    hidden = int(ffn.w_up.weight.shape[0])
    return N * SWIGLU_MATMULS * 2.0 * D * hidden
