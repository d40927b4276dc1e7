"""Atomic DeepSpeed checkpoints: ``<ckpt_dir>/<run>/step<N>/`` plus a ``latest`` file.

Every rank writes its part (model states on rank 0, its ZeRO optimizer partition on
every rank) under a hidden temporary tag ``.tmp-step<N>``; after a barrier rank 0
renames the folder to ``step<N>`` and then rewrites ``latest`` atomically (temp file +
os.replace). A run killed mid-save leaves only a hidden temporary folder, never a
``step<N>`` folder or a ``latest`` pointing at a half checkpoint.

Resuming accepts a run folder (its ``latest`` tag is used) or one ``step<N>`` folder.
The client state carries the next optimizer step, which is also the data position
(``BatchSampler`` windows are a pure function of the step).
Assumes ``ckpt_dir`` is one filesystem shared by all ranks (one machine, or a shared
mount on a cluster).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from turnout.models.errors import ConfigError
from turnout.parallel.dist import barrier

LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step{step}"


def _is_tag_dir(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*model_states.pt"))


def resolve_resume(path: str | os.PathLike) -> tuple[Path, str]:
    """(load_dir, tag) for a run folder or a step folder; ConfigError('train.resume') if not."""
    p = Path(path).expanduser()
    if _is_tag_dir(p):
        return p.parent.resolve(), p.name
    latest = p / LATEST
    if latest.is_file():
        tag = latest.read_text().strip()
        if _is_tag_dir(p / tag):
            return p.resolve(), tag
        raise ConfigError("train.resume", f"{latest} names {tag!r}, which is not a checkpoint")
    raise ConfigError(
        "train.resume", f"{path} is neither a checkpoint run folder nor a step folder"
    )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(engine: Any, run_dir: Path, step: int, client_state: dict, rank: int) -> Path:
    """Collective: write checkpoint ``step<step>`` atomically; return its folder."""
    tag = tag_for(step)
    tmp_tag = f".tmp-{tag}"
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(run_dir / tmp_tag, ignore_errors=True)
    barrier()
    engine.save_checkpoint(str(run_dir), tag=tmp_tag, client_state=client_state, save_latest=False)
    barrier()
    final = run_dir / tag
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(run_dir / tmp_tag, final)
        _write_atomic(run_dir / LATEST, tag)
    barrier()
    return final


def load(engine: Any, path: str | os.PathLike) -> dict:
    """Collective: restore model, optimizer and lr scheduler; return the client state."""
    load_dir, tag = resolve_resume(path)
    loaded, client_state = engine.load_checkpoint(
        str(load_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if loaded is None:
        raise ConfigError("train.resume", f"could not load checkpoint {load_dir / tag}")
    return client_state or {}
