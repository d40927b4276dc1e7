"""Skipped optimizer steps: counted, logged, and a run that keeps skipping is stopped.

DeepSpeed skips the optimizer update of a step whose gradients are not finite
(``OVERFLOW! Skipping step``) and holds the lr schedule; the loss it reports can stay
finite while the model diverges. :class:`SkipCounter` counts skipped steps in total and
in a row; more than ``train.max_consecutive_skipped_steps`` in a row raises
:class:`SkippedStepsError`. DeepSpeed agrees on the overflow over all ranks before it
skips, so every rank counts alike and raises at the same step, like a non-finite loss.
"""

from __future__ import annotations


class SkippedStepsError(RuntimeError):
    """Too many optimizer steps in a row were skipped; every rank raises it together."""

    def __init__(self, step: int, in_a_row: int, limit: int) -> None:
        super().__init__(
            f"{in_a_row} optimizer steps in a row skipped for non-finite gradients, up to "
            f"step {step} (train.max_consecutive_skipped_steps={limit}): the run diverged; "
            "lower train.lr or raise train.warmup_steps"
        )
        self.step = step
        self.in_a_row = in_a_row
        self.limit = limit

    def __reduce__(self) -> tuple[type[SkippedStepsError], tuple[int, int, int]]:
        return (type(self), (self.step, self.in_a_row, self.limit))


class SkipCounter:
    """Total and consecutive skipped steps; see the module doc."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        self.in_a_row = 0

    def add(self, step: int, skipped: bool) -> None:
        """Record optimizer step ``step`` (1-based); raise when the limit is passed."""
        if not skipped:
            self.in_a_row = 0
            return
        self.total += 1
        self.in_a_row += 1
        if self.in_a_row > self.limit:
            raise SkippedStepsError(step, self.in_a_row, self.limit)
