"""Batches of the function-name task in the encoder's form, and their name targets."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from turnout.models.gnn import graph_batch
from turnout.models.structure import StructureBatch, name_targets
from turnout.models.treelstm import tree_batch
from turnout.trainer.data.structure.dataset import StructureData


def structure_batch(
    data: StructureData, split: str, indices: Sequence[int], encoder: str, pad: bool = True
) -> tuple[StructureBatch, torch.Tensor]:
    """The examples ``indices`` of ``split`` as one batch for ``encoder`` ('treelstm' or
    'gnn'), and their ``[B, K]`` name targets."""
    examples = [data.splits[split].example(i) for i in indices]
    if encoder == "treelstm":
        tree = tree_batch(
            [(e.types_N, e.tokens_NL, e.parent_N, e.height_N) for e in examples], pad=pad
        )
        batch = StructureBatch(tree, None)
    else:
        graph = graph_batch(
            [(e.types_N, e.tokens_NL, e.edges_M3) for e in examples],
            len(data.edge_types),
            pad=pad,
        )
        batch = StructureBatch(None, graph)
    ids = [data.target_ids(e.name) for e in examples]
    return batch, name_targets(ids, data.max_name, data.classes)
