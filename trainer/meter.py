"""Step bookkeeping of the training loop: when to act, and what an interval measured.

Pure arithmetic (no torch, no processes), so every rule here is unit-tested alone:

- :func:`due` decides whether an every-N action (logging, validation, checkpoint) runs
  after an optimizer step;
- :class:`IntervalMeter` accumulates the steps since the last log line (mean loss,
  tokens per second) and starts over when read;
- :class:`RunMeter` accumulates the whole run's train-step time for the final
  throughput, leaving out the run's first step (lazy imports, allocator warm-up);
- :func:`model_tflops` and :func:`mfu` turn tokens/s into achieved model FLOP/s and the
  model FLOPs utilisation against a peak.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

#: Guards a tokens/s division against a zero-length interval (a clock that did not tick).
_MIN_SECONDS = 1e-9


def due(done: int, every: int, total: int) -> bool:
    """Whether an every-``every``-steps action runs after optimizer step ``done`` of ``total``.

    ``every == 0`` means only after the last step; the last step always qualifies, so a
    run ends logged, validated and checkpointed.
    """
    return done == total or (every > 0 and done % every == 0)


class Interval(NamedTuple):
    """What one log interval measured."""

    loss: float
    """Mean of the steps' losses (nan for an empty interval)."""
    tokens_per_s: float
    """Training tokens per second over the interval's steps, all ranks."""
    steps: int


@dataclass
class IntervalMeter:
    """Steps since the last log line: their losses and their wall time."""

    tokens_per_step: int
    """Tokens one optimizer step trains on, over all ranks."""
    seconds: float = 0.0
    loss_sum: float = 0.0
    steps: int = 0

    def add(self, loss: float, seconds: float) -> None:
        self.loss_sum += loss
        self.seconds += seconds
        self.steps += 1

    def flush(self) -> Interval:
        """The interval so far; the meter starts a new interval."""
        if self.steps == 0:
            out = Interval(math.nan, 0.0, 0)
        else:
            rate = self.tokens_per_step * self.steps / max(self.seconds, _MIN_SECONDS)
            out = Interval(self.loss_sum / self.steps, rate, self.steps)
        self.seconds, self.loss_sum, self.steps = 0.0, 0.0, 0
        return out


@dataclass
class RunMeter:
    """Whole-run train-step time; the first step is left out once a second one ran."""

    tokens_per_step: int
    seconds: float = 0.0
    steps: int = 0
    first_seconds: float = 0.0

    def add(self, seconds: float) -> None:
        if self.steps == 0:
            self.first_seconds = seconds
        self.seconds += seconds
        self.steps += 1

    def tokens_per_s(self) -> float:
        """Training tokens per second over the counted steps (0.0 before any step)."""
        steps, seconds = self.steps, self.seconds
        if steps > 1:
            steps, seconds = steps - 1, seconds - self.first_seconds
        return self.tokens_per_step * steps / seconds if seconds > 0 else 0.0


def model_tflops(flops_per_token: float, tokens_per_s: float) -> float:
    """Achieved model TFLOP/s: training FLOPs per token x tokens/s (all ranks) / 1e12."""
    return flops_per_token * tokens_per_s / 1e12


def mfu(tflops: float, peak_tflops: float, world: int) -> float:
    """Model FLOPs utilisation: achieved TFLOP/s over the peak of ``world`` ranks (nan
    without a positive peak)."""
    if peak_tflops <= 0 or world < 1:
        return math.nan
    return tflops / (peak_tflops * world)
