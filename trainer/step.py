"""One optimizer step of the DeepSpeed engine (collective).

:func:`run_step` runs ``grad_accum`` micro steps on this rank's shard. After each micro
step's forward, :func:`agree_finite` makes one all-reduce carry a per-rank non-finite
flag and the cross-entropy, so when any rank sees a NaN/inf loss EVERY rank raises
:class:`NonFiniteLossError` at the same point, before the backward (no rank is left
waiting in a collective the others never reach).

A step DeepSpeed skipped (its optimizer found non-finite gradients, which every rank
agrees on inside DeepSpeed) comes back as ``StepResult.skipped``; the loop counts them
(:mod:`turnout.trainer.skips`). The blocks that run the engine's collectives are named
(:func:`turnout.parallel.dist.collective`), so a rank that times out says where.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from turnout.parallel.dist import all_reduce_sum, collective
from turnout.trainer.balance import BiasBalancer
from turnout.trainer.data.batches import BatchSampler
from turnout.trainer.metrics.routing import StatsAccumulator


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite on some rank; every rank raises it together."""

    def __init__(self, step: int, ranks: list[int], world: int) -> None:
        super().__init__(
            f"non-finite loss at step {step} on rank(s) {ranks}: stopped all {world} ranks "
            "(lower train.lr or raise train.warmup_steps)"
        )
        self.step = step
        self.ranks = ranks


@dataclass(frozen=True)
class StepResult:
    loss: float
    """Cross-entropy of the step (nats/token), averaged over micro steps and ranks."""
    seconds: float
    """Wall time of the step on this rank."""
    skipped: bool = False
    """DeepSpeed skipped the optimizer update (non-finite gradients)."""


def agree_finite(loss: torch.Tensor, ce: torch.Tensor, step: int, rank: int, world: int) -> float:
    """Collective: raise NonFiniteLossError on every rank if ``loss`` is non-finite on any;
    otherwise return the cross-entropy ``ce`` averaged over the ranks."""
    flags = torch.zeros(world + 1, dtype=torch.float64)
    flags[rank] = 0.0 if bool(torch.isfinite(loss)) else 1.0
    flags[world] = float(ce)
    flags = all_reduce_sum(flags, "finite-loss check")
    bad = [r for r in range(world) if flags[r] > 0]
    if bad:
        raise NonFiniteLossError(step, bad, world)
    return float(flags[world]) / world


def run_step(
    engine: Any,
    sampler: BatchSampler,
    step: int,
    grad_accum: int,
    stats: StatsAccumulator,
    rank: int,
    world: int,
    balancer: BiasBalancer | None = None,
) -> StepResult:
    """Collective: optimizer step ``step`` (0-based) of ``grad_accum`` micro steps.

    The engine steps the optimizer and the lr schedule at the last micro step; the
    routing statistics of every micro step go into ``stats``. With a ``balancer`` (model
    .moe.balance 'bias' or 'both') the experts' selection bias then moves once, from the
    loads of this step summed over every micro step and rank.
    """
    t0 = time.perf_counter()
    ce = 0.0
    for micro in range(grad_accum):
        tokens, targets = sampler.batch(step, micro)
        with collective("forward (expert all-to-all / ZeRO gathers)"):
            out = engine(tokens.to(engine.device), targets.to(engine.device))
        ce += agree_finite(out.loss, out.ce, step + 1, rank, world) / grad_accum
        with collective("backward (gradient reduction)"):
            engine.backward(out.loss)
        with collective("optimizer step (gradient reduction / overflow check)"):
            engine.step()
        stats.add(out)
        if balancer is not None:
            balancer.add(out)
    if balancer is not None:
        balancer.step()
    skipped = not bool(engine.was_step_applied())
    return StepResult(loss=ce, seconds=time.perf_counter() - t0, skipped=skipped)
