"""Expert load at any E: the per-layer summaries, dead-expert warnings, the heatmap and
its MLflow logging (a real local sqlite store)."""

from __future__ import annotations

import logging
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from turnout.config import TurnoutConfig
from turnout.models.lm import LMOutput
from turnout.models.terms import Term
from turnout.trainer.metrics.load_stats import DeadExpertWatch, load_stats
from turnout.trainer.metrics.load_view import (
    IMAGE_KEY,
    LoadMonitor,
    image_due,
    image_pixels,
    png_bytes,
    render_heatmap,
)
from turnout.trainer.metrics.routing import StatsAccumulator
from turnout.trainer.tracking.tracker import Tracker

pytestmark = pytest.mark.unit


def test_load_stats_on_hand_made_counts() -> None:
    s = load_stats(torch.tensor([4, 4, 0, 4]))
    assert s["load_max"] == pytest.approx(1 / 3)
    assert s["load_max_over_mean"] == pytest.approx(4 / 3)
    assert s["load_min_over_mean"] == 0.0
    assert s["load_cv"] == pytest.approx(math.sqrt(1 / 48) * 4)  # population std / mean
    assert s["load_entropy"] == pytest.approx(math.log(3) / math.log(4))
    assert s["dead_experts"] == 1.0
    even = load_stats(torch.tensor([5, 5, 5, 5, 5]))
    assert even["load_max_over_mean"] == even["load_min_over_mean"] == pytest.approx(1.0)
    assert even["load_cv"] == pytest.approx(0.0, abs=1e-12)  # float64 of equal loads
    assert even["load_entropy"] == pytest.approx(1.0)
    one = load_stats(torch.tensor([0, 9, 0]))
    assert one["load_entropy"] == 0.0 and one["dead_experts"] == 2.0
    assert one["load_max_over_mean"] == pytest.approx(3.0)
    assert load_stats(torch.zeros(3))["dead_experts"] == 3.0


def _out(counts: list[int]) -> LMOutput:
    return LMOutput(logits=torch.zeros(1), stats=[{Term.MOE_COUNTS: torch.tensor(counts)}, {}])


def test_per_expert_series_only_while_few_and_summaries_always() -> None:
    for limit, series in ((4, True), (3, False), (0, False)):
        acc = StatsAccumulator(expert_series_max=limit)
        acc.add(_out([1, 3, 0, 0]))
        acc.add(_out([3, 1, 0, 4]))
        m = acc.reduce()
        assert ("layer0/expert0_load" in m) is series
        assert m["layer0/load_max_over_mean"] == pytest.approx(4 / 3)
        # Expert 2 got nothing all interval; expert 3 only missed one micro step.
        assert m["layer0/dead_experts"] == 1.0
        assert m["layer0/load_min_over_mean"] == 0.0
        summed = torch.tensor([4.0, 4.0, 0.0, 4.0], dtype=torch.float64)
        assert torch.equal(acc.last_loads[0], summed)


def test_dead_experts_are_warned_once_each(caplog: pytest.LogCaptureFixture) -> None:
    watch = DeadExpertWatch()
    with caplog.at_level(logging.WARNING, logger="turnout.trainer"):
        first = watch.check({1: torch.tensor([3.0, 0.0, 2.0, 0.0])}, 1, 10)
        again = watch.check({1: torch.tensor([3.0, 0.0, 2.0, 0.0])}, 11, 20)
        third = watch.check({1: torch.tensor([0.0, 0.0, 2.0, 1.0]), 3: torch.ones(4)}, 21, 30)
    assert len(first) == 1 and "layer 1: expert(s) 1, 3 of 4" in first[0]
    assert "steps 1-10" in first[0]
    assert again == []
    assert len(third) == 1 and "expert(s) 0 of 4" in third[0]
    assert [r.getMessage() for r in caplog.records] == first + third


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return height, width


@pytest.mark.parametrize(("layers", "experts"), [(2, 4), (12, 128)])
def test_heatmap_is_an_image_of_the_planned_size(layers: int, experts: int) -> None:
    g = torch.Generator().manual_seed(0)
    loads = {2 * i + 1: torch.randint(0, 50, (experts,), generator=g) for i in range(layers)}
    loads[1][0] = 0  # a dead expert
    image = render_heatmap(loads, "test")
    assert image.dtype == np.uint8 and image.shape == (*image_pixels(layers, experts), 3)
    assert _png_size(png_bytes(image)) == image_pixels(layers, experts)
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 10  # drawn, not blank


def test_image_schedule() -> None:
    # every 100 steps, logging every 30: steps 120 (first past 100), 210, 300, and the end.
    due, last = [], 0
    for d in range(30, 331, 30):
        if image_due(d, 100, last, 330):
            due.append(d)
            last = d
    assert due == [120, 210, 300, 330]
    assert not any(image_due(d, 0, 0, 330) for d in range(30, 331, 30))


def test_heatmap_is_logged_to_a_local_mlflow_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = TurnoutConfig()
    cfg.tracking.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg.tracking.load_image_every = 10
    cfg.train.steps = 20
    tracker = Tracker(cfg, rank=0, world_size=1)
    monitor = LoadMonitor(cfg, tracker, rank=0)
    loads = {1: torch.tensor([5.0, 0.0, 3.0, 8.0]), 3: torch.tensor([4.0, 4.0, 4.0, 4.0])}
    assert monitor.observe(loads, 5) is False  # not yet due
    assert monitor.observe(loads, 10) is True
    tracker.finish()
    import mlflow

    client = mlflow.MlflowClient(cfg.tracking.uri)
    run = client.get_run(tracker.run_id)
    pngs = [
        a.path
        for a in client.list_artifacts(run.info.run_id, "images")
        if a.path.endswith(".png") and IMAGE_KEY in a.path
    ]
    assert len(pngs) == 1 and "+step+10+" in pngs[0]
    local = client.download_artifacts(run.info.run_id, pngs[0], str(tmp_path / "got"))
    assert _png_size(Path(local).read_bytes()) == image_pixels(2, 4)
    # An inactive tracker (rank > 0) draws nothing and logs nothing.
    other = LoadMonitor(cfg, Tracker(cfg, rank=1, world_size=2), rank=1)
    assert other.observe(loads, 10) is False
