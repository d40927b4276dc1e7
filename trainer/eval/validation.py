"""The one validation loop: cross-entropy (and the depth histogram) over fixed windows.

Training's validation (:func:`evaluate`, collective over the DeepSpeed engine), the
decode-rule depth metrics of early-exit and ponder models
(:func:`turnout.trainer.eval.depth.depth_eval`) and ``turnout eval`` on a loaded model
(:func:`turnout.trainer.eval.inference.evaluate_model`, one process) all run
:func:`validation_pass`; they differ in the model they hand it, the routing, and whether
the sums are reduced over ranks.

Shape legend: B batch, S sequence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from turnout.parallel.dist import all_reduce_sum
from turnout.trainer.data.batches import BatchSampler

#: Sums a float64 vector over the ranks (None: one process, nothing to reduce).
Reduce = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ValidationPass:
    loss: float
    """Mean cross-entropy over the windows (and over ranks when reduced), nats/token."""
    depth_counts: dict[int, float] = field(default_factory=dict)
    """Blocks used -> tokens, at the levels asked for (empty when none were)."""


@torch.no_grad()
def validation_pass(
    model: Any,
    sampler: BatchSampler,
    batches: int,
    routing: str,
    device: torch.device,
    levels: Sequence[int] = (),
    reduce: Reduce | None = None,
) -> ValidationPass:
    """Run ``model`` (a ``TransformerLM`` or the engine wrapping one) in eval mode over
    the first ``batches`` validation batches of ``sampler``; with ``levels``, count the
    tokens at each depth of the model's depth histogram. ``reduce`` makes it collective:
    every rank gets the mean over all ranks' windows. A model in train mode is handed
    back in train mode."""
    was_training = getattr(model, "training", True)
    model.eval()
    total = 0.0
    counts = torch.zeros(len(levels), dtype=torch.float64)
    for i in range(batches):
        tokens_BS, targets_BS = sampler.eval_batch(i)
        out = model(tokens_BS.to(device), targets_BS.to(device), routing=routing)
        total += float(out.ce)
        if levels and out.depth is not None:
            hist = out.depth.histogram()
            counts += torch.tensor([hist.get(k, 0) for k in levels], dtype=torch.float64)
    if was_training:
        model.train()
    sums = torch.cat([torch.tensor([total / batches, 1.0], dtype=torch.float64), counts])
    if reduce is not None:
        sums = reduce(sums)
    loss = float(sums[0] / sums[1])
    return ValidationPass(loss, dict(zip(levels, sums[2:].tolist(), strict=True)))


def evaluate(engine: Any, sampler: BatchSampler, batches: int, routing: str) -> float:
    """Collective: mean validation cross-entropy over all ranks' fixed windows."""
    over_ranks = partial(all_reduce_sum, name="validation loss")
    return validation_pass(engine, sampler, batches, routing, engine.device, (), over_ranks).loss
