"""A Mixture-of-Recursions model trains through the real engine and resumes at another layout.

Two gloo ranks train a tiny recursion model (expert routing, a group of 2 blocks, 3
recursions) under ZeRO-2 and checkpoint; one rank under ZeRO-1 resumes from that
checkpoint, saves the loaded state straight back (weights and AdamW moments must be the
very same tensors) and trains on; its losses must match the uninterrupted run's.
The global batch is the same at both layouts (gradient accumulation follows the world).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.test_reshard import LOSS_TOL, _assert_same_state, _layout, _phase
from tests.distributed.test_train_loop import _overrides
from tests.margins import assert_clear
from tests.spawn import run_ranks
from turnout.config.load import load_config
from turnout.trainer.data.batches import prepare_corpus

pytestmark = pytest.mark.distributed

N, K = 3, 2


@pytest.mark.parametrize("cache", ["per_recursion", "shared_first"])
def test_recursion_model_trains_and_resumes_at_another_layout(tmp_path: Path, cache: str) -> None:
    base = [
        *_overrides(tmp_path, steps=N + K),
        "model.n_layers=3",
        "model.layer_pattern=[dense,recursion,dense]",
        "model.recursion.max_recursions=3",
        "model.recursion.group=2",
        "model.recursion.predictor_hidden=8",
        f"model.recursion.cache={cache}",
        "tracking.enabled=false",
        "train.peak_tflops=1",
        "train.precision=fp32",
        "train.ckpt_every=0",
        "train.grad_accum=2",
        # Router scores of order 1, so the top-k cuts sit clear of ties (checked below).
        "model.init_std=0.2",
    ]
    data = str(prepare_corpus(load_config("tiny", base).data))
    ref = run_ranks(
        _phase, 2, [*base, *_layout(2, 1, 2)], data, "", N + K, [N], str(tmp_path / "ref")
    )
    for rank, out in enumerate(ref):
        assert_clear(out["gap"], f"reference rank {rank}: {out['worst']}")
        assert "recursion" in out["worst"]  # the recorder saw the recursions' cuts
    resumed = run_ranks(
        _phase,
        1,
        [*base, *_layout(1, 1, 1)],
        data,
        ref[0]["folders"][N],
        N + K,
        [N],
        str(tmp_path / "resumed"),
    )[0]
    _assert_same_state(ref[0]["folders"][N], resumed["folders"][N], moments_of=None)
    for step in range(N, N + K):
        assert resumed["losses"][step] == pytest.approx(ref[0]["losses"][step], **LOSS_TOL)
