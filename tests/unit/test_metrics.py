"""Routing metrics from LMOutput.stats: load fractions, max/mean, averaged scalars."""

from __future__ import annotations

import pytest
import torch

from turnout.models.lm import LMOutput
from turnout.models.terms import Term
from turnout.trainer.metrics.routing import StatsAccumulator

pytestmark = pytest.mark.unit


def _out(counts: list[int], drop: float, cap: float, acc: float, lb: float) -> LMOutput:
    return LMOutput(
        logits=torch.zeros(1),
        terms={Term.MOE_LB: torch.tensor(lb)},
        stats=[
            {},
            {
                Term.MOE_COUNTS: torch.tensor(counts),
                Term.MOE_DROP: torch.tensor(drop),
                Term.MOE_LB: torch.tensor(lb),
            },
            {},
            {Term.MOD_CAPACITY: torch.tensor(cap), Term.MOD_PRED_ACC: torch.tensor(acc)},
        ],
    )


def test_counts_are_summed_then_normalised_and_scalars_averaged() -> None:
    acc = StatsAccumulator()
    acc.add(_out([1, 3, 0, 0], drop=0.0, cap=0.5, acc=0.8, lb=1.0))
    acc.add(_out([3, 1, 0, 4], drop=0.5, cap=0.5, acc=0.6, lb=2.0))
    m = acc.reduce()  # single process: the all-reduce is the identity
    assert [m[f"layer1/expert{e}_load"] for e in range(4)] == pytest.approx(
        [4 / 12, 4 / 12, 0, 4 / 12]
    )
    assert m["layer1/load_max"] == pytest.approx(1 / 3)
    assert m["layer1/load_max_over_mean"] == pytest.approx(4 / 3)
    assert m["layer1/drop_fraction"] == pytest.approx(0.25)
    assert m["layer3/mod_capacity"] == pytest.approx(0.5)
    assert m["layer3/mod_pred_acc"] == pytest.approx(0.7)
    assert m["aux/moe_lb"] == pytest.approx(1.5)
    assert m["layer1/moe_lb"] == pytest.approx(1.5)
    # reduce() starts a new interval.
    assert acc.n == 0 and not acc.counts and not acc.scalars
