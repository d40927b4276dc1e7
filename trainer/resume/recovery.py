"""Automatic recovery: where a restarted attempt of a job resumes, and what it trains again.

Under Ray Train with ``launch.max_failures > 0`` a worker that dies takes its whole
worker group down; Ray starts a new group, which runs the training function from the
start. The launcher fixed the job's checkpoint run folder (:func:`run_folder`) before
the first attempt and hands every attempt the same one, so a restarted attempt finds
what the failed one saved there without any help from Ray:

- :func:`newest_checkpoint` is the one place that decides which checkpoint of a run
  folder is complete: the newest step folder whose manifest's files are all there.
- :func:`begin_attempt` (collective) tells the first attempt from a restart by the
  run folder's :data:`RECOVERY_FILE`. Rank 0 writes it when an attempt begins and
  after every optimizer step (the last completed step), so the next attempt knows where
  the failed one got to: the steps between the checkpoint it resumes from and that step
  are trained again ("steps redone").

No tensors here; this module never imports torch at import time (the launcher calls
:func:`run_folder`).
"""

from __future__ import annotations

import datetime as _dt
import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from turnout.config import TurnoutConfig
from turnout.errors import DiskError
from turnout.files import tag_step, write_atomic

if TYPE_CHECKING:
    from turnout.trainer.tracking.tracker import Tracker

#: Rank 0's record of the job's attempts in the checkpoint run folder (JSON).
RECOVERY_FILE = "recovery.json"


def run_folder(cfg: TurnoutConfig, run_id: str) -> Path:
    """A fresh checkpoint run folder ``<ckpt_dir>/<name>-<time>-<id>`` for one job."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = cfg.tracking.run_name or "run"
    suffix = run_id[:8] if run_id else secrets.token_hex(4)
    return Path(cfg.train.ckpt_dir).expanduser().resolve() / f"{name}-{stamp}-{suffix}"


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of ``run_dir`` (a step folder), or None.

    Complete: a ``step<N>`` folder whose manifest lists files that are all there with
    their sizes (:func:`turnout.trainer.checkpointing.manifest.is_complete`; the manifest is written
    after every rank's files). The highest such N wins, whatever ``latest`` says: a kill
    between the folder's rename and the rewrite of ``latest`` loses nothing, and a
    damaged newest folder falls back to the one before."""
    from turnout.trainer.checkpointing.manifest import is_complete

    try:
        steps = [
            (step, p)
            for p in run_dir.iterdir()
            if p.is_dir() and (step := tag_step(p.name)) is not None
        ]
    except OSError:
        return None
    for _, folder in sorted(steps, reverse=True):
        if is_complete(folder):
            return folder
    return None


def _checkpoint_step(path: str) -> int:
    """The step a checkpoint (a step folder, or a run folder's latest) was saved after."""
    from turnout.trainer.checkpointing.files import resolve_resume

    _, tag = resolve_resume(path)
    return tag_step(tag) or 0


@dataclass(frozen=True)
class Restart:
    """One restart of the job: where it resumed and what it had to train again."""

    resumed_from: str
    """The checkpoint (step folder) the restarted attempt loaded; '' = from scratch."""
    from_step: int
    """The step that checkpoint was saved after (0 from scratch)."""
    failed_at: int
    """The last step the failed attempt completed."""

    @property
    def redone(self) -> int:
        """Steps the failed attempt had trained after the checkpoint: trained again."""
        return max(0, self.failed_at - self.from_step)


@dataclass
class Attempt:
    """This attempt of the job, as every rank sees it."""

    number: int = 0
    """0 for the first attempt, n for the n-th restart."""
    resume: str = ""
    """The checkpoint this attempt resumes from ('' = the config's own ``train.resume``)."""
    restarts: list[Restart] = field(default_factory=list)
    path: Path | None = None
    """The recovery file rank 0 writes; None where recovery is off or on other ranks."""

    @property
    def steps_redone(self) -> int:
        return sum(r.redone for r in self.restarts)

    def record(self, step: int) -> None:
        """Rank 0: optimizer step ``step`` is done (cheap: one small atomic write)."""
        if self.path is not None:
            _write(self.path, self.number, step, self.restarts)


def _write(path: Path, attempt: int, step: int, restarts: list[Restart]) -> None:
    """The recovery record, atomically; a full or read-only disk is a
    :class:`~turnout.errors.DiskError` (not retried) and leaves no temporary file."""
    from turnout.trainer.checkpointing.disk import writing

    record = {
        "attempt": attempt,
        "step": step,
        "restarts": [
            {"resumed_from": r.resumed_from, "from_step": r.from_step, "failed_at": r.failed_at}
            for r in restarts
        ],
    }
    text = json.dumps(record)
    with writing(path, len(text), f"the run folder's {RECOVERY_FILE}"):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text)


def read_recovery(run_dir: Path) -> dict[str, Any] | None:
    """The run folder's recovery record, or None when no attempt has begun there."""
    try:
        record = json.loads((run_dir / RECOVERY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _next_attempt(run_dir: Path, own_resume: str) -> Attempt:
    """Rank 0: this attempt, from what the previous ones left in ``run_dir``."""
    before = read_recovery(run_dir)
    if before is None:
        return Attempt(0, "", [], run_dir / RECOVERY_FILE)
    restarts = [
        Restart(str(r["resumed_from"]), int(r["from_step"]), int(r["failed_at"]))
        for r in before.get("restarts", [])
    ]
    newest = newest_checkpoint(run_dir)
    resume = str(newest) if newest is not None else own_resume
    from_step = _checkpoint_step(resume) if resume else 0
    restarts.append(Restart(resume, from_step, int(before.get("step", 0))))
    return Attempt(int(before.get("attempt", 0)) + 1, resume, restarts, run_dir / RECOVERY_FILE)


def begin_attempt(run_dir: Path, rank: int, own_resume: str) -> Attempt:
    """Collective: decide on rank 0 whether this is a restart and where it resumes; every
    rank gets the same :class:`Attempt` (only rank 0's writes the recovery file).

    ``own_resume``: the config's ``train.resume``, where a restart resumes when the
    failed attempt saved no checkpoint of its own."""
    from turnout.parallel.dist import broadcast_object

    attempt = _next_attempt(run_dir, own_resume) if rank == 0 else None
    chosen: object = None
    if attempt is not None:
        step = attempt.restarts[-1].from_step if attempt.restarts else 0
        try:
            _write(attempt.path or run_dir / RECOVERY_FILE, attempt.number, step, attempt.restarts)
            chosen = (attempt.number, attempt.resume, attempt.restarts)
        except DiskError as e:  # every rank stops with rank 0's line
            chosen = e.message
    shared = broadcast_object(chosen, name="recovery attempt")
    if isinstance(shared, str):
        raise DiskError(shared)
    number, resume, restarts = cast(tuple[int, str, list[Restart]], shared)
    return Attempt(number, resume, list(restarts), attempt.path if attempt else None)


def log_restart(tracker: Tracker, rank: int, attempt: Attempt, start: int) -> None:
    """A restarted attempt, once its checkpoint is loaded (``start``: the step it resumes
    after): one line on rank 0, and the MLflow run (the same run id: the launcher's) gets
    the tag ``resumed_from`` like a manual resume, the tag ``restarts`` and the metrics
    ``restarts`` and ``steps_redone`` at step ``start``."""
    if not attempt.restarts:
        return
    from turnout.trainer.tracking.store import RESUMED_FROM_TAG

    last = attempt.restarts[-1]
    if rank == 0:
        where = f"{last.resumed_from} (step {start})" if last.resumed_from else "the start"
        print(
            f"turnout: restart {attempt.number}: a worker failed after step {last.failed_at}; "
            f"resumed from {where}, {last.redone} step(s) to train again",
            flush=True,
        )
    tags = {"restarts": str(attempt.number)}
    if last.resumed_from:
        tags[RESUMED_FROM_TAG] = last.resumed_from
    tracker.set_tags(tags)
    metrics = {"restarts": float(attempt.number), "steps_redone": float(attempt.steps_redone)}
    tracker.log_metrics(metrics, step=start)
