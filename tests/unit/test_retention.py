"""Checkpoint retention (train.keep_checkpoints, train.keep_every): which step folders a
prune deletes, that recovery's choice and ``latest`` are never among them, and the line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from turnout.config.train import TrainConfig
from turnout.trainer.checkpointing import manifest, retention
from turnout.trainer.checkpointing.files import LATEST, META_FILE
from turnout.trainer.resume.recovery import newest_checkpoint

pytestmark = pytest.mark.unit


def _checkpoint(run_dir: Path, step: int, latest: bool = True) -> Path:
    folder = run_dir / f"step{step}"
    folder.mkdir(parents=True)
    torch.save({"format": "x", "step": step}, folder / META_FILE)
    (folder / "dense.pt").write_bytes(b"\x00" * 1000)
    manifest.write(folder)
    if latest:
        (run_dir / LATEST).write_text(folder.name)
    return folder


def _names(run_dir: Path) -> set[str]:
    return {p.name for p in run_dir.iterdir()}


def test_keep_the_newest_n_and_every_multiple(tmp_path: Path) -> None:
    for step in range(10, 110, 10):
        _checkpoint(tmp_path, step)
    pruned = retention.prune(tmp_path, keep=2, every=40, saved="step100")
    assert pruned.kept == ["step40", "step80", "step90", "step100"]
    assert pruned.removed == ["step10", "step20", "step30", "step50", "step60", "step70"]
    assert pruned.freed == 6 * sum(p.stat().st_size for p in (tmp_path / "step90").iterdir())
    assert _names(tmp_path) == {"step40", "step80", "step90", "step100", LATEST}
    # What recovery and train.resume=<run folder> would load is still there, whole.
    assert newest_checkpoint(tmp_path) == tmp_path / "step100"
    manifest.verify(tmp_path / "step100")


def test_zero_keeps_everything(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        _checkpoint(tmp_path, step)
    (tmp_path / ".tmp-step4").mkdir()
    assert retention.prune(tmp_path, keep=0) == retention.Pruned()
    assert _names(tmp_path) == {"step1", "step2", "step3", ".tmp-step4", LATEST}


def test_incomplete_folders_are_neither_counted_nor_deleted_and_leftovers_go(
    tmp_path: Path,
) -> None:
    for step in (10, 20, 30):
        _checkpoint(tmp_path, step)
    (tmp_path / "step40").mkdir()  # no manifest: not a finished save; the user's to inspect
    (tmp_path / "step25").mkdir()
    (tmp_path / "step25" / "dense.pt").write_bytes(b"x")
    (tmp_path / ".tmp-step35").mkdir()  # a save killed before its manifest
    (tmp_path / ".tmp-step35" / "dense.pt").write_bytes(b"y" * 10)
    (tmp_path / ".pruned-step5").mkdir()  # a delete killed half-way
    pruned = retention.prune(tmp_path, keep=1, saved="step30")
    assert pruned.removed == ["step10", "step20"]
    assert pruned.leftovers == [".pruned-step5", ".tmp-step35"]
    assert _names(tmp_path) == {"step25", "step30", "step40", LATEST}


def test_the_checkpoint_just_saved_and_latest_are_kept(tmp_path: Path) -> None:
    # A newer step folder from before (another branch of the run): the one just saved
    # and the one latest names stay even when they are not among the newest N.
    _checkpoint(tmp_path, 50, latest=False)
    _checkpoint(tmp_path, 60, latest=False)
    _checkpoint(tmp_path, 20)  # latest -> step20
    _checkpoint(tmp_path, 30, latest=False)
    pruned = retention.prune(tmp_path, keep=1, saved="step30")
    assert pruned.kept == ["step20", "step30", "step60"]
    assert pruned.removed == ["step50"]


def test_after_save_prints_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for step in (3, 6, 9):
        _checkpoint(tmp_path, step)
    t = TrainConfig(keep_checkpoints=2)
    size = sum(p.stat().st_size for p in (tmp_path / "step3").iterdir())
    retention.after_save(tmp_path, tmp_path / "step9", t)
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"turnout: pruned step3 from {tmp_path} (train.keep_checkpoints=2; {size} bytes freed); "
        "kept step6, step9"
    ]
    retention.after_save(tmp_path, tmp_path / "step9", t)  # nothing left to prune: silent
    assert capsys.readouterr().out == ""
