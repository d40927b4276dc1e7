"""Checkpoints on 2 gloo ranks (ep 2, ZeRO-2) when the disk says no, and retention.

train() with ``train.keep_checkpoints=2`` keeps the newest two step folders and those
``train.keep_every`` names. Then rank 1 alone meets a write that cannot succeed (a
file-size limit, ``RLIMIT_FSIZE``, below the size of its expert slice: a real EFBIG from
the kernel, portable to any user and filesystem) while rank 0 writes its files fine: both
ranks must raise the same one-line :class:`DiskError` together (no rank left waiting in
a collective), the hidden ``.tmp-step<N>`` folder must be gone, and the previous
checkpoint must still be ``latest``, whole, and load.
"""

from __future__ import annotations

import json
import resource
from pathlib import Path

import pytest

from tests.distributed.test_train_loop import WORLD, _overrides
from tests.spawn import run_ranks
from turnout.config.load import load_config
from turnout.trainer.data.batches import prepare_corpus

pytestmark = pytest.mark.distributed

LIMIT = 4096
"""Rank 1's file-size limit in bytes: its expert slice of the test model is ~70 KB."""


def _train_then_fail(rank: int, world: int, overrides: list[str], data: str) -> dict:
    from turnout.errors import DiskError
    from turnout.parallel.groups import build_groups
    from turnout.trainer.checkpointing import collective as checkpoint
    from turnout.trainer.run_setup import setup
    from turnout.trainer.train import train

    cfg = load_config("tiny", overrides)
    groups = build_groups(cfg.parallel.ep_size)
    first = train(cfg, Path(data), groups)
    run_dir = Path(first.checkpoint).parent
    kept = sorted(p.name for p in run_dir.iterdir())
    resumed = load_config("tiny", [*overrides, f"train.resume={run_dir}"])
    run = setup(resumed, Path(data), groups, run_dir=run_dir)
    start = int(checkpoint.load(run.engine, run_dir, groups)["step"])
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if rank == 1:
        resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, hard))
    try:
        checkpoint.save(run.engine, run_dir, start + 1, {"step": start + 1}, groups, resumed)
        error = ""
    except DiskError as e:
        error = str(e)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    after = sorted(p.name for p in run_dir.iterdir())
    again = int(checkpoint.load(run.engine, run_dir, groups)["step"])
    run.tracker.finish("FINISHED")
    return {"kept": kept, "after": after, "error": error, "start": start, "again": again}


def test_retention_and_a_failed_save_on_one_rank(tmp_path: Path) -> None:
    from turnout.trainer.checkpointing import manifest
    from turnout.trainer.resume.recovery import newest_checkpoint

    overrides = [
        *_overrides(tmp_path, steps=5),
        "tracking.enabled=false",
        "train.peak_tflops=1",
        "train.ckpt_every=1",
        "train.keep_checkpoints=2",
        "train.keep_every=2",
        "train.eval_every=0",
    ]
    data = prepare_corpus(load_config("tiny", overrides).data)
    results = run_ranks(_train_then_fail, WORLD, overrides, str(data))
    r0, r1 = results
    # Retention: the newest two (step4, step5) and every multiple of 2 (step2); step1 and
    # step3 pruned after the saves that followed them.
    steps = [n for n in r0["kept"] if n.startswith("step")]
    assert sorted(steps) == ["step2", "step4", "step5"], r0["kept"]
    assert not [n for n in r0["kept"] if n.startswith(".")], r0["kept"]
    # The failed save: the same one line on both ranks, naming rank 1's file and bytes.
    assert r0["error"] == r1["error"]
    assert r0["error"].startswith("train.ckpt_dir: file too large"), r0["error"]
    assert "(EFBIG) writing " in r0["error"] and "/.tmp-step6/experts_ep1.pt: " in r0["error"]
    assert "the checkpoint needs about " in r0["error"] and "\n" not in r0["error"]
    # Nothing of it left; the previous checkpoint is latest, whole, and loads.
    assert r0["after"] == r0["kept"], r0["after"]
    run_dir = Path(tmp_path / "ckpt")
    (folder,) = [p for p in run_dir.iterdir() if p.is_dir()]
    assert (folder / "latest").read_text() == "step5"
    manifest.verify(folder / "step5")
    assert newest_checkpoint(folder) == folder / "step5"
    assert r0["start"] == r0["again"] == 5 and r1["again"] == 5
    assert json.loads((folder / "step5" / "manifest.json").read_text())["files"]
