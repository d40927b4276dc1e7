"""Warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch

from turnout.trainer.schedule import build_scheduler, lr_at

pytestmark = pytest.mark.unit

LR, MIN_LR, WARMUP, TOTAL = 1e-3, 1e-4, 10, 110


def test_warmup_is_linear_and_reaches_peak() -> None:
    assert lr_at(0, LR, MIN_LR, WARMUP, TOTAL) == pytest.approx(LR / WARMUP)
    assert lr_at(4, LR, MIN_LR, WARMUP, TOTAL) == pytest.approx(LR * 5 / WARMUP)
    assert lr_at(WARMUP - 1, LR, MIN_LR, WARMUP, TOTAL) == pytest.approx(LR)


def test_cosine_key_points() -> None:
    # Decay spans steps WARMUP .. TOTAL-1 (99 steps here): peak right after warmup,
    # halfway between lr and min_lr in the middle, a third of the way at cos(pi/3).
    assert lr_at(WARMUP, LR, MIN_LR, WARMUP, TOTAL) == pytest.approx(LR)
    assert lr_at(WARMUP + 99 // 2, LR, MIN_LR, WARMUP, TOTAL) == pytest.approx(
        MIN_LR + 0.5 * (LR - MIN_LR) * (1 + math.cos(math.pi * 49 / 99))
    )
    assert lr_at(60, LR, MIN_LR, WARMUP, 111) == pytest.approx((LR + MIN_LR) / 2)
    assert lr_at(WARMUP + 33, LR, MIN_LR, WARMUP, TOTAL) == pytest.approx(
        MIN_LR + 0.5 * (LR - MIN_LR) * (1 + math.cos(math.pi / 3))
    )
    assert lr_at(TOTAL - 1, LR, MIN_LR, WARMUP, TOTAL) == pytest.approx(MIN_LR)
    assert lr_at(TOTAL + 50, LR, MIN_LR, WARMUP, TOTAL) == pytest.approx(MIN_LR)


def test_decay_is_monotone() -> None:
    values = [lr_at(s, LR, MIN_LR, WARMUP, TOTAL) for s in range(WARMUP, TOTAL)]
    assert all(a >= b for a, b in zip(values[:-1], values[1:], strict=True))


def test_no_warmup_and_single_step() -> None:
    assert lr_at(0, LR, MIN_LR, 0, TOTAL) == pytest.approx(LR)
    assert lr_at(0, LR, MIN_LR, 0, 1) == pytest.approx(LR)
    assert lr_at(0, LR, MIN_LR, 5, 3) == pytest.approx(LR / 5)


def test_lambda_lr_follows_lr_at() -> None:
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [p]}], lr=LR)
    sched = build_scheduler(opt, LR, MIN_LR, WARMUP, TOTAL)
    seen = []
    for _ in range(TOTAL):
        seen.append(opt.param_groups[0]["lr"])
        sched.step()
    assert seen == pytest.approx([lr_at(s, LR, MIN_LR, WARMUP, TOTAL) for s in range(TOTAL)])
