"""Functions dealt to ranks by global slot: the function-name task's batch sampler.

Shape legend: B functions of a micro batch, K name positions.

The slots are the token sampler's (:class:`turnout.trainer.data.batches.SlotRule`):
global sample slot ``j`` of optimizer step ``s`` is the training function its generator
draws, and micro step ``m`` of rank ``r`` takes slots ``(m * world + r) * B ..``
``+ B - 1``. So a run resumed at another world size (the global batch kept through
``train.grad_accum``) trains on the same micro batches, and the data position is the
step alone. A step's draws are kept until the next step: the rank's batches and the
step's node count (every rank's slots) read them once. Validation takes
``eval_batches x B x world`` functions spread evenly over the held-out files'
functions, dealt round-robin to ranks.
"""

from __future__ import annotations

import numpy as np
import torch

from turnout.errors import ConfigError
from turnout.models.structure import StructureBatch
from turnout.trainer.data.batches import SlotRule
from turnout.trainer.data.structure.batches import structure_batch
from turnout.trainer.data.structure.dataset import StructureData


class StructureSampler(SlotRule):
    def __init__(
        self,
        data: StructureData,
        encoder: str,
        micro_batch: int,
        rank: int,
        world: int,
        seed: int,
        eval_batches: int = 1,
    ) -> None:
        super().__init__(micro_batch, rank, world, seed)
        self.data = data
        self.encoder = encoder
        self._drawn: tuple[int, dict[int, int]] = (-1, {})
        self.train_size = len(data.splits["train"])
        val_size = len(data.splits["val"])
        if val_size == 0:
            raise ConfigError(
                "data.val_fraction",
                "no function is in a held-out file; raise it or give data.corpus more files",
            )
        offsets = np.asarray(data.splits["train"].a["node_off"])
        self.train_nodes = np.diff(offsets)
        total = eval_batches * micro_batch * world
        picks = np.linspace(0, val_size - 1, num=total).round().astype(np.int64)
        self.eval_examples = self.deal(picks, eval_batches)
        self.eval_distinct = int(np.unique(picks).size)

    def slot_example(self, step: int, slot: int) -> int:
        """The training function of global sample slot ``slot`` at optimizer step ``step``."""
        if self._drawn[0] != step:
            self._drawn = (step, {})
        drawn = self._drawn[1]
        if slot not in drawn:
            drawn[slot] = int(self.slot_rng(step, slot).integers(0, self.train_size))
        return drawn[slot]

    def indices(self, step: int, micro: int = 0) -> list[int]:
        return [self.slot_example(step, j) for j in self.slots(micro)]

    def batch(self, step: int, micro: int = 0) -> tuple[StructureBatch, torch.Tensor]:
        """(the batch, its ``[B, K]`` name targets) for this rank at (step, micro)."""
        return structure_batch(self.data, "train", self.indices(step, micro), self.encoder)

    def step_nodes(self, step: int, slots: int) -> int:
        """Real nodes of the first ``slots`` global slots of ``step`` (a whole optimizer
        step over every rank: the same number on every rank, with no communication)."""
        return int(sum(self.train_nodes[self.slot_example(step, j)] for j in range(slots)))

    def eval_batch(self, i: int) -> tuple[StructureBatch, torch.Tensor]:
        return structure_batch(self.data, "val", self.eval_examples[i].tolist(), self.encoder)

    def eval_names(self, i: int) -> list[str]:
        return [self.data.splits["val"].names[f] for f in self.eval_examples[i]]
