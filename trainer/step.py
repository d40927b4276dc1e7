"""One optimizer step of the DeepSpeed engine (collective).

:func:`run_step` runs ``grad_accum`` micro steps on this rank's shard. After each micro
step's forward, :func:`agree_finite` makes one all-reduce carry a per-rank non-finite
flag and the cross-entropy, so when any rank sees a NaN/inf loss EVERY rank raises
:class:`NonFiniteLossError` at the same point, before the backward (no rank is left
waiting in a collective the others never reach). The same all-reduce carries each
rank's stop request (:mod:`turnout.trainer.stop`): after the step every rank knows the
same :class:`~turnout.trainer.stop.StopVote`, at no extra collective.

A step DeepSpeed skipped (its optimizer found non-finite gradients, which every rank
agrees on inside DeepSpeed) comes back as ``StepResult.skipped``; the loop counts them
(:mod:`turnout.trainer.skips`). The blocks that run the engine's collectives are named
(:func:`turnout.parallel.dist.collective`), so a rank that times out says where.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from turnout.parallel.dist import all_reduce_sum, collective
from turnout.trainer.balance import BiasBalancer
from turnout.trainer.data.batches import BatchSampler
from turnout.trainer.metrics.routing import StatsAccumulator
from turnout.trainer.stop import StopVote
from turnout.trainer.structure.sampler import StructureSampler

#: A rank's stop request: (the launcher asked, this process was signalled).
StopAsk = Callable[[], tuple[bool, bool]]


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
    vote: StopVote = StopVote()
    """The stop every rank agreed on during the step (no stop by default)."""


def agree_step(
    loss: torch.Tensor,
    ce: torch.Tensor,
    step: int,
    rank: int,
    world: int,
    asks: tuple[bool, bool] = (False, False),
) -> tuple[float, StopVote]:
    """Collective: raise NonFiniteLossError on every rank if ``loss`` is non-finite on any;
    otherwise the cross-entropy ``ce`` averaged over the ranks, and the stop vote of
    every rank's ``asks`` (the launcher asked, this process was signalled)."""
    flags = torch.zeros(2 * world + 2, dtype=torch.float64)
    flags[rank] = 0.0 if bool(torch.isfinite(loss)) else 1.0
    flags[world] = float(ce)
    flags[world + 1 + rank] = 1.0 if asks[1] else 0.0
    flags[2 * world + 1] = 1.0 if asks[0] else 0.0
    flags = all_reduce_sum(flags, "finite-loss check")
    bad = [r for r in range(world) if flags[r] > 0]
    if bad:
        raise NonFiniteLossError(step, bad, world)
    signalled = tuple(r for r in range(world) if flags[world + 1 + r] > 0)
    vote = StopVote(launcher=bool(flags[2 * world + 1] > 0), signalled_ranks=signalled)
    return float(flags[world]) / world, vote


def agree_finite(loss: torch.Tensor, ce: torch.Tensor, step: int, rank: int, world: int) -> float:
    """:func:`agree_step` without stop requests: the mean cross-entropy."""
    return agree_step(loss, ce, step, rank, world)[0]


def run_step(
    engine: Any,
    sampler: BatchSampler | StructureSampler,
    step: int,
    grad_accum: int,
    stats: StatsAccumulator,
    rank: int,
    world: int,
    balancer: BiasBalancer | None = None,
    ask_stop: StopAsk | None = None,
) -> StepResult:
    """Collective: optimizer step ``step`` (0-based) of ``grad_accum`` micro steps.

    The engine steps the optimizer and the lr schedule at the last micro step; the
    routing statistics of every micro step go into ``stats``. With a ``balancer`` (model
    .moe.balance 'bias' or 'both') the experts' selection bias then moves once, from the
    loads of this step summed over every micro step and rank. ``ask_stop``: this rank's
    stop request, read before every micro step's reduction; the votes of the step's
    micro steps are joined into ``StepResult.vote`` (equal on every rank).
    """
    t0 = time.perf_counter()
    ce = 0.0
    launcher, signalled = False, set[int]()
    for micro in range(grad_accum):
        tokens, targets = sampler.batch(step, micro)
        with collective("forward (expert all-to-all / ZeRO gathers)"):
            out = engine(tokens.to(engine.device), targets.to(engine.device))
        asks = ask_stop() if ask_stop is not None else (False, False)
        mean_ce, vote = agree_step(out.loss, out.ce, step + 1, rank, world, asks)
        ce += mean_ce / grad_accum
        launcher, signalled = launcher or vote.launcher, signalled | set(vote.signalled_ranks)
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
    vote = StopVote(launcher, tuple(sorted(signalled)))
    return StepResult(ce, time.perf_counter() - t0, skipped, vote)
