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
    """Tokens one optimizer step trains on, over all ranks (the default of ``add``)."""
    seconds: float = 0.0
    loss_sum: float = 0.0
    steps: int = 0
    units: int = 0

    def add(self, loss: float, seconds: float, units: int | None = None) -> None:
        """One step; ``units``: what it trained on when not ``tokens_per_step`` (a
        structure run's nodes vary by step)."""
        self.loss_sum += loss
        self.seconds += seconds
        self.steps += 1
        self.units += self.tokens_per_step if units is None else units

    def flush(self) -> Interval:
        """The interval so far; the meter starts a new interval."""
        if self.steps == 0:
            out = Interval(math.nan, 0.0, 0)
        else:
            rate = self.units / max(self.seconds, _MIN_SECONDS)
            out = Interval(self.loss_sum / self.steps, rate, self.steps)
        self.seconds, self.loss_sum, self.steps, self.units = 0.0, 0.0, 0, 0
        return out


@dataclass
class RunMeter:
    """Whole-run train-step time; the first step is left out once a second one ran."""

    tokens_per_step: int
    seconds: float = 0.0
    steps: int = 0
    first_seconds: float = 0.0
    units: int = 0
    """Everything the run's steps trained on (the first step included)."""
    first_units: int = 0

    def add(self, seconds: float, units: int | None = None) -> None:
        units = self.tokens_per_step if units is None else units
        if self.steps == 0:
            self.first_seconds, self.first_units = seconds, units
        self.seconds += seconds
        self.steps += 1
        self.units += units

    def tokens_per_s(self) -> float:
        """Training tokens (units) per second over the counted steps (0.0 before any)."""
        units, seconds = self.units, self.seconds
        if self.steps > 1:
            units, seconds = units - self.first_units, seconds - self.first_seconds
        return units / seconds if seconds > 0 else 0.0


def model_tflops(flops_per_token: float, tokens_per_s: float) -> float:
    """Achieved model TFLOP/s: training FLOPs per token x tokens/s (all ranks) / 1e12."""
    return flops_per_token * tokens_per_s / 1e12


def mfu(tflops: float, peak_tflops: float, world: int) -> float:
    """Model FLOPs utilisation: achieved TFLOP/s over the peak of ``world`` ranks (nan
    without a positive peak)."""
    if peak_tflops <= 0 or world < 1:
        return math.nan
    return tflops / (peak_tflops * world)
