"""The function-name task's data in a run: the cache built once, opened on every rank.

:func:`turnout.trainer.data.structure.prepare.prepare_structure` runs on the launcher
before any worker starts (the token cache's place in a language-model run);
:func:`open_structure` opens the folder it built on a rank.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from turnout.config import TurnoutConfig
from turnout.trainer.data.inputs import RunInputs
from turnout.trainer.data.structure.dataset import StructureData
from turnout.trainer.structure.sampler import StructureSampler


def target_entropy(data: StructureData) -> float:
    """Entropy (nats) of the scored name positions' classes over the training split: the
    loss of a model that ignores the function."""
    end = data.classes
    counts: Counter[int] = Counter()
    for name in data.splits["train"].names:
        ids = data.target_ids(name)
        counts.update(ids + ([end] if len(ids) < data.max_name else []))
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


def open_structure(cfg: TurnoutConfig, folder: Path, rank: int, world: int) -> RunInputs:
    t = cfg.train
    data = StructureData(folder)
    sampler = StructureSampler(
        data,
        cfg.model.structure.encoder,
        t.micro_batch_size,
        rank,
        world,
        t.seed,
        t.eval_batches,
    )
    s = data.stats
    params = {
        "structure.cache": folder.name,
        "structure.files": s.files,
        "structure.files_failed": s.failed,
        "structure.functions": s.functions,
        "structure.train_examples": len(data.splits["train"]),
        "structure.val_examples": len(data.splits["val"]),
        "structure.eval_examples": sampler.eval_distinct,
        "structure.targets": len(data.targets),
    }
    datasets = {"training": (str(data.meta["corpus"]), folder.name)}
    return RunInputs(
        sampler,
        target_entropy(data),
        {k: str(v) for k, v in params.items()},
        datasets,
    )
