"""The tracking outbox: ordered delivery that survives a store outage, bounded at close,
with what the store never took written to the fallback file (named in one warning)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from turnout.trainer.skips import SkipCounter, SkippedStepsError
from turnout.trainer.tracking.queue import Outbox, Record

pytestmark = pytest.mark.unit


class FlakyStore:
    """A store that refuses every write while ``down`` is set."""

    def __init__(self) -> None:
        self.down = threading.Event()
        self.got: list[Record] = []

    def send(self, record: Record) -> None:
        if self.down.is_set():
            raise ConnectionError("Connection refused\nsecond line")
        self.got.append(record)


def test_outage_delays_but_loses_nothing(tmp_path: Path) -> None:
    store, warnings = FlakyStore(), []
    store.down.set()
    box = Outbox(store.send, tmp_path / "pending.jsonl", warnings.append)
    t0 = time.monotonic()
    for step in range(50):
        box.put({"kind": "metrics", "step": step})
    assert time.monotonic() - t0 < 0.5  # put never waits on the store
    time.sleep(1.0)  # a few failed retries
    assert store.got == [] and box.failures >= 1
    store.down.clear()
    assert box.close(timeout_s=20)
    assert [r["step"] for r in store.got] == list(range(50))  # in order, each once
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert str(tmp_path / "pending.jsonl") in warnings[0]
    assert "Connection refused" in warnings[0]
    assert not (tmp_path / "pending.jsonl").exists()


def test_close_is_bounded_and_spills_the_rest(tmp_path: Path) -> None:
    store, warnings = FlakyStore(), []
    store.down.set()
    box = Outbox(store.send, tmp_path / "p" / "pending.jsonl", warnings.append)
    for step in range(5):
        box.put({"kind": "metrics", "step": step})
    t0 = time.monotonic()
    assert not box.close(timeout_s=0.5)
    assert time.monotonic() - t0 < 2.0
    lines = (tmp_path / "p" / "pending.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == list(range(5))
    assert box.spilled == 5 and len(warnings) == 1


def test_memory_is_bounded_oldest_spill_first(tmp_path: Path) -> None:
    store = FlakyStore()
    store.down.set()
    box = Outbox(store.send, tmp_path / "pending.jsonl", lambda _: None, max_pending=3)
    for step in range(10):
        box.put({"step": step})
    spilled = [
        json.loads(ln)["step"] for ln in (tmp_path / "pending.jsonl").read_text().splitlines()
    ]
    assert spilled == list(range(7))
    store.down.clear()
    assert box.close(timeout_s=20)
    assert [r["step"] for r in store.got] == [7, 8, 9]


def test_skip_counter_stops_past_the_limit_in_a_row() -> None:
    skips = SkipCounter(limit=2)
    for step, skipped in enumerate([True, True, False, True, True], start=1):
        skips.add(step, skipped)
    assert skips.total == 4 and skips.in_a_row == 2
    with pytest.raises(SkippedStepsError, match=r"3 optimizer steps in a row .* step 6 "):
        skips.add(6, True)
    never = SkipCounter(limit=0)
    never.add(1, False)
    with pytest.raises(SkippedStepsError, match="max_consecutive_skipped_steps=0"):
        never.add(2, True)
