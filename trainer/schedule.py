"""Learning-rate schedule: linear warmup, then cosine decay to ``min_lr``.

``lr_at`` is a pure function of the optimizer step (0-based: the lr used by the
step-th update). ``lr_lambda`` adapts it to ``torch.optim.lr_scheduler.LambdaLR``,
whose multiplier is relative to each param group's initial lr (the peak ``lr``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR


def lr_at(step: int, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based).

    Warmup: ``lr * (step + 1) / warmup_steps`` for ``step < warmup_steps`` (the first
    update already moves, the last warmup step reaches the peak). Then cosine from
    ``lr`` at ``step == warmup_steps`` to ``min_lr`` at ``step == total_steps - 1``;
    constant ``min_lr`` afterwards.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = total_steps - 1 - warmup_steps
    if decay_steps <= 0:
        return lr
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def lr_lambda(
    lr: float, min_lr: float, warmup_steps: int, total_steps: int
) -> Callable[[int], float]:
    """Multiplier of the peak lr for LambdaLR."""

    def factor(step: int) -> float:
        return lr_at(step, lr, min_lr, warmup_steps, total_steps) / lr

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, lr: float, min_lr: float, warmup_steps: int, total_steps: int
) -> LambdaLR:
    """A LambdaLR over ``optimizer`` (whose groups start at the peak ``lr``)."""
    return LambdaLR(optimizer, lr_lambda(lr, min_lr, warmup_steps, total_steps))
