"""No silent hangs, no silent divergence, on 2 gloo ranks.

- A rank that waits in a collective longer than ``parallel.timeout_s`` fails with a
  :class:`CollectiveError` naming the collective, within about that time.
- A run whose optimizer steps keep being skipped (DeepSpeed's overflow check: non-finite
  gradients; reproduced with train.lr=50) stops on every rank at the same step, with
  one line naming ``train.max_consecutive_skipped_steps``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from tests.spawn import run_ranks
from turnout.config.load import load_config
from turnout.trainer.data.batches import prepare_corpus

pytestmark = pytest.mark.distributed

WORLD = 2
TIMEOUT_S = 2.0


def _stall_rank1(rank: int, world: int) -> tuple[str, float]:
    from turnout.parallel.dist import CollectiveError, all_reduce_sum

    if rank == 1:
        time.sleep(3 * TIMEOUT_S)  # never joins rank 0's all-reduce in time
    t0 = time.monotonic()
    try:
        all_reduce_sum(torch.ones(2), "finite-loss check")
    except CollectiveError as e:
        return str(e), time.monotonic() - t0
    return "no error", time.monotonic() - t0


def test_a_stalled_rank_fails_the_collective_by_name() -> None:
    (msg0, waited0), (msg1, _) = run_ranks(_stall_rank1, WORLD, timeout_s=TIMEOUT_S)
    assert msg0.startswith("parallel.timeout_s: collective 'finite-loss check' failed: ")
    assert "Timed out" in msg0 and "\n" not in msg0
    assert waited0 < TIMEOUT_S + 3.0  # bounded by parallel.timeout_s, not 30 minutes
    # The late rank finds its peer gone: its error names the collective too.
    assert msg1.startswith("parallel.timeout_s: collective 'finite-loss check' failed")


def _overrides(tmp_path: Path) -> list[str]:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i} of a small corpus for skips" for i in range(3000)))
    return [
        "model.max_seq_len=32",
        f"data.corpus={corpus}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "train.steps=30",
        "train.lr=50",
        "train.min_lr=1",
        "train.warmup_steps=1",
        "train.micro_batch_size=2",
        "train.eval_every=0",
        "train.eval_batches=1",
        "train.max_consecutive_skipped_steps=3",
        f"train.ckpt_dir={tmp_path / 'ckpt'}",
        "tracking.enabled=false",
        "train.peak_tflops=1",
        f"launch.num_workers={WORLD}",
    ]


def _train_expect_skips(rank: int, world: int, overrides: list[str], data: str) -> str:
    from turnout.parallel.groups import build_groups
    from turnout.trainer.skips import SkippedStepsError
    from turnout.trainer.train import train

    cfg = load_config("tiny", overrides)
    try:
        res = train(cfg, Path(data), build_groups(cfg.parallel.ep_size))
    except SkippedStepsError as e:
        return str(e)
    return f"no error after {res.steps} steps, {res.skipped_steps} skipped"


def test_diverging_run_stops_every_rank_after_skipped_steps(tmp_path: Path) -> None:
    overrides = _overrides(tmp_path)
    data = prepare_corpus(load_config("tiny", overrides).data)
    messages = run_ranks(_train_expect_skips, WORLD, overrides, str(data))
    assert messages[0] == messages[1], messages
    assert messages[0].startswith("4 optimizer steps in a row skipped"), messages[0]
    assert "train.max_consecutive_skipped_steps=3" in messages[0]
    assert "\n" not in messages[0]
    # It stopped long before the last step, and nothing was checkpointed.
    assert int(messages[0].split("up to step ")[1].split()[0]) < 30
    assert not any((tmp_path / "ckpt").rglob("step*"))
