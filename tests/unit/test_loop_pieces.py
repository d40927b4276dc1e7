"""The training loop's pieces that need no process group: when to log / validate /
checkpoint, interval and whole-run metering, the finite-loss agreement at world 1, and
the expert-parallel preconditions of the engine builder."""

from __future__ import annotations

import math

import pytest
import torch

from tests.tiny import tiny_mode_cfg
from turnout.models.lm import TransformerLM
from turnout.parallel.expert_parallel import (
    expert_params,
    install_expert_parallel,
    prepare_for_deepspeed,
)
from turnout.parallel.groups import Layout, ParallelGroups
from turnout.trainer.meter import IntervalMeter, RunMeter, due
from turnout.trainer.step import NonFiniteLossError, agree_finite

pytestmark = pytest.mark.unit


def _steps_due(every: int, total: int, start: int = 0) -> list[int]:
    return [done for done in range(start + 1, total + 1) if due(done, every, total)]


def test_due_every_n_and_always_after_the_last_step() -> None:
    assert _steps_due(every=2, total=6) == [2, 4, 6]
    assert _steps_due(every=4, total=6) == [4, 6]  # the last step although 6 % 4 != 0
    assert _steps_due(every=0, total=5) == [5]  # 0 = only at the end
    assert _steps_due(every=1, total=3) == [1, 2, 3]
    assert _steps_due(every=3, total=6, start=3) == [6]  # a resumed run keeps the grid
    assert _steps_due(every=10, total=6) == [6]


def test_interval_meter_means_and_restarts_on_flush() -> None:
    meter = IntervalMeter(tokens_per_step=1000)
    meter.add(loss=3.0, seconds=0.5)
    meter.add(loss=2.0, seconds=1.5)
    first = meter.flush()
    assert first.loss == pytest.approx(2.5)
    assert first.tokens_per_s == pytest.approx(2000 / 2.0)
    assert first.steps == 2
    meter.add(loss=1.0, seconds=0.25)
    second = meter.flush()  # only the step since the last flush
    assert (second.loss, second.tokens_per_s, second.steps) == (1.0, 4000.0, 1)
    empty = meter.flush()
    assert math.isnan(empty.loss) and empty.tokens_per_s == 0.0 and empty.steps == 0


def test_interval_meter_survives_a_clock_that_did_not_tick() -> None:
    meter = IntervalMeter(tokens_per_step=10)
    meter.add(loss=1.0, seconds=0.0)
    interval = meter.flush()
    assert math.isfinite(interval.tokens_per_s) and interval.tokens_per_s > 0


def test_run_meter_leaves_out_the_first_step_once_a_second_ran() -> None:
    meter = RunMeter(tokens_per_step=100)
    assert meter.tokens_per_s() == 0.0
    meter.add(10.0)  # the slow first step (imports, warm-up)
    assert meter.tokens_per_s() == pytest.approx(100 / 10.0)  # one step: it counts
    meter.add(1.0)
    meter.add(3.0)
    assert meter.tokens_per_s() == pytest.approx(2 * 100 / 4.0)


def test_agree_finite_returns_the_mean_ce_and_stops_on_nan() -> None:
    # world 1 without a process group: the all-reduce is the identity.
    loss = torch.tensor(2.5)
    assert agree_finite(loss, torch.tensor(2.0), step=1, rank=0, world=1) == pytest.approx(2.0)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(NonFiniteLossError) as info:
            agree_finite(torch.tensor(bad), torch.tensor(2.0), step=7, rank=0, world=1)
        assert info.value.step == 7 and info.value.ranks == [0]
        assert str(info.value).startswith("non-finite loss at step 7 on rank(s) [0]")


def _groups_ep2(rank: int) -> ParallelGroups:
    # Rank arithmetic only: the handles are never used before the checks below.
    return ParallelGroups(Layout(2, 2), rank, ep_group=None, edp_group=None, dp_group=None)


def test_engine_preparation_refuses_a_model_without_expert_parallelism() -> None:
    model = TransformerLM(tiny_mode_cfg(1.25, 0.5))
    with pytest.raises(RuntimeError, match="install_expert_parallel"):
        prepare_for_deepspeed(model, _groups_ep2(0))


def test_expert_params_are_the_installed_slice() -> None:
    torch.manual_seed(0)
    model = TransformerLM(tiny_mode_cfg(1.25, 0.5))
    assert expert_params(model) == {}
    install_expert_parallel(model, _groups_ep2(1))
    params = expert_params(model)
    bank = model.layers[1].block.ffn.experts
    assert params and set(params) == {
        f"layers.1.block.ffn.experts.{n}" for n, _ in bank.named_parameters()
    }
    assert all(p.shape[0] == 2 for p in params.values())  # 4 experts over ep 2
