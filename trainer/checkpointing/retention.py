"""Checkpoint retention: which checkpoints of a run folder stay after a save.

``train.keep_checkpoints=N`` (0 = keep all) and ``train.keep_every=M`` (0 = none). After
every checkpoint, once the collective save has finished (its manifest is written, the
folder renamed, ``latest`` rewritten), rank 0 calls :func:`after_save`, which prunes:

- Only complete checkpoints count and are deleted: ``step<N>`` folders whose manifest
  lists files that are all there with their sizes (the test
  :func:`turnout.trainer.resume.recovery.newest_checkpoint` uses). A step folder that
  is not complete (damaged, or from a save without a manifest) is left for the user and
  not counted.
- Kept: the N complete checkpoints with the highest steps; every one whose step is a
  multiple of M; the one just saved and the one ``latest`` names (both the newest in a
  run that only moves forward). So the checkpoint recovery resumes (the newest complete
  one) and the one ``train.resume=<run folder>`` loads (``latest``) are never pruned.
- Deleted as well: hidden leftovers of saves that never finished (``.tmp-step<N>``) and
  of deletes that were interrupted (``.pruned-step<N>``). Rank 0 prunes between saves,
  when no rank is writing into the folder.
- A deleted folder is first renamed to ``.pruned-step<N>`` (atomic), so a kill during
  the delete never leaves a ``step<N>`` folder with some of its files.

What was deleted is one line on rank 0. Then the free space is checked against the size
of the checkpoint just written (:func:`turnout.trainer.checkpointing.disk.warn_if_short`):
the next save needs as much again before anything can be pruned.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from turnout.config.train import TrainConfig
from turnout.files import tag_step
from turnout.trainer.checkpointing import disk, manifest
from turnout.trainer.checkpointing.files import latest_tag

#: Hidden folder names of an unfinished save and of an interrupted delete.
LEFTOVER_PREFIXES = (".tmp-step", ".pruned-step")


@dataclass
class Pruned:
    """What one :func:`prune` deleted, and what it kept."""

    removed: list[str] = field(default_factory=list)
    """Tags of the complete checkpoints deleted, oldest first."""
    leftovers: list[str] = field(default_factory=list)
    """Hidden folders of unfinished saves or deletes removed."""
    kept: list[str] = field(default_factory=list)
    """Tags of the complete checkpoints kept, oldest first."""
    freed: int = 0
    """Bytes deleted."""


def _folder_bytes(folder: Path) -> int:
    total = 0
    for p in folder.rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_size
        except OSError:
            continue
    return total


def _delete(folder: Path) -> int:
    """Rename ``folder`` out of sight, then delete it; the bytes it held."""
    size = _folder_bytes(folder)
    hidden = folder
    if not folder.name.startswith("."):
        hidden = folder.with_name(f".pruned-{folder.name}")
        shutil.rmtree(hidden, ignore_errors=True)
        os.replace(folder, hidden)
    shutil.rmtree(hidden, ignore_errors=True)
    return size


def prune(run_dir: Path, keep: int, every: int = 0, saved: str = "") -> Pruned:
    """Delete the complete checkpoints of ``run_dir`` that the rule above does not keep
    (``keep`` = train.keep_checkpoints, 0 = none deleted; ``every`` = train.keep_every;
    ``saved``: the tag just written, always kept); see the module doc."""
    out = Pruned()
    if keep <= 0:
        return out
    complete: list[tuple[int, Path]] = []
    leftovers: list[Path] = []
    for p in run_dir.iterdir():
        if not p.is_dir():
            continue
        if p.name.startswith(LEFTOVER_PREFIXES):
            leftovers.append(p)
        elif (step := tag_step(p.name)) is not None and manifest.is_complete(p):
            complete.append((step, p))
    complete.sort()
    protected = {saved, latest_tag(run_dir)}
    newest = {p.name for _, p in complete[-keep:]}
    for step, p in complete:
        if p.name in newest or p.name in protected or (every > 0 and step % every == 0):
            out.kept.append(p.name)
        else:
            out.freed += _delete(p)
            out.removed.append(p.name)
    for p in sorted(leftovers):
        out.freed += _delete(p)
        out.leftovers.append(p.name)
    return out


def describe(pruned: Pruned, run_dir: Path, t: TrainConfig) -> str:
    """The one line saying what :func:`prune` deleted ('' when nothing)."""
    if not pruned.removed and not pruned.leftovers:
        return ""
    gone = ", ".join(pruned.removed + pruned.leftovers)
    rule = f"train.keep_checkpoints={t.keep_checkpoints}"
    if t.keep_every:
        rule += f", train.keep_every={t.keep_every}"
    return (
        f"turnout: pruned {gone} from {run_dir} ({rule}; {disk.size_text(pruned.freed)} freed); "
        f"kept {', '.join(pruned.kept) or 'none'}"
    )


def after_save(run_dir: Path, folder: Path, t: TrainConfig) -> Pruned:
    """Rank 0, after the collective save of ``folder`` has finished: prune (one line when
    anything was deleted), then warn once if the next checkpoint will not fit."""
    pruned = prune(run_dir, t.keep_checkpoints, t.keep_every, saved=folder.name)
    line = describe(pruned, run_dir, t)
    if line:
        print(line, flush=True)
    size = manifest.total_bytes(folder)
    disk.warn_if_short(run_dir, size, f"the next checkpoint after {folder.name}")
    return pruned
