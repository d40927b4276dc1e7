"""Training FLOPs per node of a structure run, counted on its own batches.

A structure model's cost per node depends on the batch (a function's size, the padded
level lists and edge lists, the decoder's padded node layout), so it is counted, not
derived: :func:`~turnout.models.structure_flops.batch_flops` on the first micro batch of
the run's first :data:`SAMPLE_STEPS` steps (the same batches on every rank), summed and
divided by their real nodes, times 3 for forward and backward. 256 steps because the
attention baseline's cost per node follows each batch's longest function: over 8 steps
its estimate ranged 1.83-2.86 MFLOPs per node across 4 seeds, over 256 steps 2.09-2.18
(the graph network's 1.51-1.54, the Tree-LSTM's 1.10-1.10), about 0.3 s at start-up.
The dense twin (MoE FFNs replaced by dense ones of ``model.ffn_dim``) is counted on the
same batches, on the meta device.
"""

from __future__ import annotations

import torch

from turnout.config import TurnoutConfig
from turnout.models.structure import StructureBatch, StructureModel
from turnout.models.structure_flops import batch_flops
from turnout.trainer.data.structure.batches import structure_batch
from turnout.trainer.structure.model import dense_twin, structure_model
from turnout.trainer.structure.sampler import StructureSampler

SAMPLE_STEPS = 256
TRAIN_PER_FORWARD = 3


def per_node(model: StructureModel, sampler: StructureSampler, steps: int = SAMPLE_STEPS) -> float:
    """Training FLOPs per real node of ``model`` on the first micro batch of the first
    ``steps`` steps."""
    flops = nodes = 0.0
    for step in range(steps):
        batch, _ = structure_batch_of(sampler, step)
        flops += batch_flops(model, batch)
        nodes += batch.num_nodes
    return TRAIN_PER_FORWARD * flops / nodes


def structure_batch_of(sampler: StructureSampler, step: int) -> tuple[StructureBatch, torch.Tensor]:
    """Global slots 0 .. B-1 of ``step`` as a batch, whatever the rank."""
    ids = [sampler.slot_example(step, j) for j in range(sampler.micro_batch)]
    return structure_batch(sampler.data, "train", ids, sampler.encoder)


def structure_run_flops(cfg: TurnoutConfig, sampler: StructureSampler) -> tuple[float, float]:
    """Training FLOPs per node of the run's model and of its dense twin."""
    with torch.device("meta"):
        model = structure_model(cfg)
        dense = structure_model(dense_twin(cfg))
    return per_node(model, sampler), per_node(dense, sampler)
