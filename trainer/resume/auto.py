"""``train.resume=auto``: continue the newest checkpoint a run of this same config saved.

A scheduler that preempts a job (SIGTERM, then a re-run later) runs the same command
line again. With ``train.resume=auto`` that command finds where the job got to by
itself: among the run folders in ``train.ckpt_dir``, the complete checkpoints
(:func:`turnout.trainer.resume.recovery.newest_checkpoint`) whose ``config.yaml`` equals
this run's config apart from :data:`IGNORED` keys; the highest step wins (then the most
recently written). None found: the run starts fresh. :func:`resolve_auto` runs on the
launcher after the paths are made absolute, so the checkpoint's own ``config.yaml``
(absolute paths too) compares equal when the command runs in the same folder; the
result is an ordinary ``train.resume`` (checked, and the MLflow run reopened, as one).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from turnout.config import TurnoutConfig
from turnout.config.load import flatten, load_config
from turnout.config.train import RESUME_AUTO
from turnout.errors import ConfigError
from turnout.files import CONFIG_FILE, tag_step

#: Keys that may differ between the runs of one job: where it resumed from, which
#: MLflow run it appends to, and where the cluster and Ray's state are.
IGNORED = frozenset({"train.resume", "tracking.run_id", "launch.address", "launch.storage_path"})


def _identity(cfg: TurnoutConfig) -> dict[str, str]:
    return {k: v for k, v in flatten(cfg).items() if k not in IGNORED}


def auto_checkpoint(cfg: TurnoutConfig) -> Path | None:
    """The newest complete checkpoint in ``train.ckpt_dir`` of a run of ``cfg``, or None."""
    from turnout.trainer.resume.recovery import newest_checkpoint

    root = Path(cfg.train.ckpt_dir).expanduser()
    try:
        run_dirs = [p for p in root.iterdir() if p.is_dir()]
    except OSError:
        return None
    want = _identity(cfg)
    found: list[tuple[int, float, Path]] = []
    for run_dir in run_dirs:
        folder = newest_checkpoint(run_dir)
        if folder is None:
            continue
        try:
            saved = load_config(str(folder / CONFIG_FILE))
            mtime = folder.stat().st_mtime
        except (ConfigError, OSError):  # another schema or a damaged file: not this job's
            continue
        if _identity(saved) == want:
            found.append((tag_step(folder.name) or 0, mtime, folder))
    return max(found)[2] if found else None


def resolve_auto(cfg: TurnoutConfig) -> TurnoutConfig:
    """``cfg`` with ``train.resume=auto`` replaced by the checkpoint it means ('' when
    there is none: a fresh start); any other ``cfg`` unchanged."""
    if cfg.train.resume != RESUME_AUTO:
        return cfg
    folder = auto_checkpoint(cfg)
    resume = str(folder) if folder is not None else ""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=resume))
