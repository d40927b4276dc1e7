"""Summaries of one layer's expert load over a log interval, and the dead-expert warning.

Shape legend: R real experts of a layer. The counts are assignments per expert (before
drops) summed over every rank and micro step of the interval.
"""

from __future__ import annotations

import logging
import math

import torch

from turnout.models.terms import (
    DEAD_EXPERTS,
    LOAD_CV,
    LOAD_ENTROPY,
    LOAD_MAX,
    LOAD_MAX_OVER_MEAN,
    LOAD_MIN_OVER_MEAN,
)

log = logging.getLogger("turnout.trainer")


def load_stats(counts_R: torch.Tensor) -> dict[str, float]:
    """Per-layer load metrics from one layer's global counts.

    ``load_max``: the largest load fraction; ``load_max_over_mean`` / ``load_min_over_mean``:
    the largest / smallest load over the mean (1 = balanced); ``load_cv``: coefficient of
    variation (population std over mean, 0 = balanced); ``load_entropy``: entropy of the
    load fractions over log R (1 = balanced, 0 = one expert takes all; 1 when R = 1);
    ``dead_experts``: experts with no assignment. An interval without assignments gives
    zeros and every expert dead.
    """
    c_R = counts_R.detach().to("cpu", torch.float64)
    R = c_R.numel()
    total = float(c_R.sum())
    dead = float((c_R == 0).sum())
    if total <= 0:
        zero = (LOAD_MAX, LOAD_MAX_OVER_MEAN, LOAD_MIN_OVER_MEAN, LOAD_CV, LOAD_ENTROPY)
        return {**dict.fromkeys(zero, 0.0), DEAD_EXPERTS: dead}
    frac_R = c_R / total
    mean = 1.0 / R
    nz = frac_R[frac_R > 0]
    entropy = float(-(nz * nz.log()).sum())
    return {
        LOAD_MAX: float(frac_R.max()),
        LOAD_MAX_OVER_MEAN: float(frac_R.max()) / mean,
        LOAD_MIN_OVER_MEAN: float(frac_R.min()) / mean,
        LOAD_CV: float(frac_R.std(unbiased=False)) / mean,
        LOAD_ENTROPY: entropy / math.log(R) if R > 1 else 1.0,
        DEAD_EXPERTS: dead,
    }


class DeadExpertWatch:
    """Warns in the log when an expert gets no token in a log interval: once per expert
    per run (a dead expert usually stays dead; one line per layer and interval lists
    the newly dead ones), so a long run's log is not flooded."""

    def __init__(self) -> None:
        self.warned: set[tuple[int, int]] = set()

    def check(self, loads: dict[int, torch.Tensor], first_step: int, last_step: int) -> list[str]:
        """Log (and return) one warning line per layer with newly dead experts."""
        lines = []
        for layer in sorted(loads):
            dead = [int(e) for e in torch.nonzero(loads[layer] == 0).flatten()]
            new = [e for e in dead if (layer, e) not in self.warned]
            if not new:
                continue
            self.warned.update((layer, e) for e in new)
            lines.append(
                f"layer {layer}: expert(s) {', '.join(map(str, new))} of {loads[layer].numel()} "
                f"got no tokens in steps {first_step}-{last_step} (dead experts; "
                f"model.moe.balance=bias or a larger aux_loss_coef may revive them)"
            )
        for line in lines:
            log.warning(line)
        return lines
