"""Held-out function names: cross-entropy, subtoken precision / recall / F1, exact match.

One pass (:func:`name_pass`) serves training's validation (collective, over the engine:
every rank scores its share and the sums are reduced) and ``turnout eval`` (one process,
a loaded model). F1 is code2vec's, from the true-positive, false-positive and
false-negative counts summed over every function of every rank
(:mod:`turnout.trainer.data.structure.names`); the truth is the whole name's subtokens,
so a subtoken outside the target vocabulary is a miss.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import torch

from turnout.config import TurnoutConfig
from turnout.errors import ConfigError
from turnout.models.structure import StructureModel
from turnout.trainer.data.structure.dataset import StructureData
from turnout.trainer.data.structure.names import NameScore, counts, from_counts, subtokens
from turnout.trainer.eval.validation import Reduce
from turnout.trainer.structure.sampler import StructureSampler

log = logging.getLogger("turnout.trainer")


@dataclass(frozen=True)
class NamePass:
    loss: float
    """Cross-entropy per scored name position (nats): each batch's mean, averaged over
    the batches and ranks."""
    score: NameScore
    corpus: str = ""


@torch.no_grad()
def name_pass(
    model: Any,
    sampler: StructureSampler,
    batches: int,
    device: torch.device,
    reduce: Reduce | None = None,
) -> NamePass:
    """Run ``model`` (a ``StructureModel`` or the engine wrapping one) in eval mode over
    the first ``batches`` validation batches; ``reduce`` sums over ranks. A model in train
    mode is handed back in train mode."""
    was_training = getattr(model, "training", True)
    model.eval()
    inner = getattr(model, "module", model)
    ce = 0.0
    sums = [0, 0, 0, 0, 0]
    for i in range(batches):
        batch, targets_BK = sampler.eval_batch(i)
        out = model(batch.to(device), targets_BK.to(device))
        ce += float(out.ce)
        predicted = [sampler.data.target_words(ids) for ids in inner.predict(out.logits_BKV)]
        truth = [subtokens(name) for name in sampler.eval_names(i)]
        sums = [a + b for a, b in zip(sums, counts(predicted, truth), strict=True)]
    if was_training:
        model.train()
    total = torch.tensor([ce / batches, 1.0, *sums], dtype=torch.float64)
    if reduce is not None:
        total = reduce(total)
    return NamePass(float(total[0] / total[1]), from_counts(*total[2:].tolist()))


def evaluate_names(
    model: StructureModel,
    cfg: TurnoutConfig,
    corpus: str | None = None,
    batches: int | None = None,
    targets: list[str] | None = None,
) -> NamePass:
    """``turnout eval`` of a function-name model (one process): the held-out functions the
    training run validated on (``train.eval_batches`` batches of ``micro_batch_size x
    num_workers``), or ``batches`` of them, of ``corpus`` (default: the run's).
    ``targets``: the name classes the model was trained with (its checkpoint's); they
    replace the cache's, so another corpus (or another Python's stdlib) is read and
    scored with the model's own class meanings."""
    from turnout.trainer.data.structure.prepare import prepare_structure

    n_batches = cfg.train.eval_batches if batches is None else batches
    if n_batches < 1:
        raise ConfigError("--batches", f"must be >= 1, got {n_batches}")
    if corpus is not None:
        cfg = replace(cfg, data=replace(cfg.data, corpus=corpus))
    folder, warning = prepare_structure(cfg)
    if warning:
        log.warning("%s", warning)
    data = StructureData(folder)
    if targets is not None:
        data.use_targets(targets)
    per_batch = cfg.train.micro_batch_size * cfg.launch.num_workers
    encoder = cfg.model.structure.encoder
    sampler = StructureSampler(data, encoder, per_batch, 0, 1, cfg.train.seed, n_batches)
    device = next(model.parameters()).device
    res = name_pass(model, sampler, n_batches, device)
    return replace(res, corpus=cfg.data.corpus)
