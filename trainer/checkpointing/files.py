"""The checkpoint on disk: its file names, and readers that need no process group.

A step folder ``<ckpt_dir>/<run>/step<N>/`` holds ``dense.pt``, one ``experts_ep<j>.pt``
per expert slice, ``meta.pt``, ``config.yaml``, ``tokenizer.json`` and ``manifest.json``
(the format and why it is ours: :mod:`turnout.trainer.checkpointing.collective`). Everything
here reads those files in one process: export, recovery, the resume-layout preflight and
the tracking store's resume lookup use it without importing ``turnout.parallel``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from turnout.errors import CheckpointError, ConfigError
from turnout.files import tag_step

LATEST = "latest"


META_FILE = "meta.pt"


DENSE_FILE = "dense.pt"


FORMAT = "turnout-ckpt-2"
"""Format tag in ``meta.pt``: per-parameter fp32 masters + moments, experts by global index."""


def expert_slice_file(folder: Path, ep_rank: int) -> Path:
    """The file holding the experts that ep rank ``ep_rank`` held when saving."""
    return folder / f"experts_ep{ep_rank}.pt"


def _is_tag_dir(path: Path) -> bool:
    return path.is_dir() and (path / META_FILE).is_file()


def resolve_resume(path: str | os.PathLike) -> tuple[Path, str]:
    """(load_dir, tag) for a run folder or a step folder; ConfigError('train.resume') if not."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError("train.resume", f"{path} does not exist")
    if _is_tag_dir(p):
        return p.parent.resolve(), p.name
    latest = p / LATEST
    if latest.is_file():
        raw = latest.read_bytes()[:256]
        try:
            tag = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            tag = ""
        if tag_step(tag) is None:
            raise ConfigError(
                "train.resume",
                f"{latest} is damaged (it should name a step folder, e.g. 'step20', and holds "
                f"{raw[:24]!r}); name a step folder of {p} instead",
            )
        if _is_tag_dir(p / tag):
            return p.resolve(), tag
        raise ConfigError("train.resume", f"{latest} names {tag!r}, which is not a checkpoint")
    raise ConfigError(
        "train.resume", f"{path} is neither a checkpoint run folder nor a step folder"
    )


def latest_tag(run_dir: Path) -> str:
    """The ``step<N>`` tag ``run_dir/latest`` names; '' when it has none (or garbage)."""
    try:
        tag = (run_dir / LATEST).read_bytes()[:256].decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return tag if tag_step(tag) is not None else ""


def persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The module buffers that belong in a state dict (not the recomputed ones)."""
    out: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        skip: set[str] = getattr(module, "_non_persistent_buffers_set", set())
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and name not in skip:
                out[f"{prefix}.{name}" if prefix else name] = buf
    return out


def read_meta(folder: Path) -> dict[str, Any]:
    path = folder / META_FILE
    try:
        meta = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one line
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint")
    return meta


def load_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        # mmap: a rank reads only the expert rows it takes.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from None


def read_expert_files(folder: Path, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Every expert file of a checkpoint (memory-mapped), in the order they were listed."""
    return [load_file(folder / name) for name in meta["expert_files"]]


def expert_rows(
    files: list[dict[str, Any]], name: str, first: int, count: int, key: str, folder: Path
) -> torch.Tensor:
    """Rows ``first .. first+count-1`` (global expert indices) of expert weight ``name``."""
    pieces: list[torch.Tensor] = []
    at = first
    while at < first + count:
        for f in files:
            t = f["params"].get(name, {}).get(key)
            if t is None:
                continue
            off = int(f["offset"][name])
            if off <= at < off + t.shape[0]:
                end = min(first + count, off + t.shape[0])
                pieces.append(t[at - off : end - off])
                at = end
                break
        else:
            raise CheckpointError(f"{folder} holds no expert {at} of {name}")
    return torch.cat(pieces, dim=0)


def consolidated_master(
    folder: Path,
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor], dict[str, Any]]:
    """Every parameter of a step folder, whole (experts by global index), as
    ``{'param', 'exp_avg', 'exp_avg_sq'}`` in fp32 (tied parameters under each of their
    names, as in a state dict); the persistent buffers; ``meta.pt``."""
    meta = read_meta(folder)
    dense_file = load_file(folder / DENSE_FILE)
    params = {n: {k: t.clone() for k, t in v.items()} for n, v in dense_file["params"].items()}
    files = read_expert_files(folder, meta)
    for f in files:
        for name, value in f["params"].items():
            if name in params:
                continue
            total = sum(g["params"][name]["param"].shape[0] for g in files if name in g["params"])
            keys = tuple(value)
            params[name] = {k: expert_rows(files, name, 0, total, k, folder) for k in keys}
    for alias, name in dense_file.get("aliases", {}).items():
        params[alias] = params[name]
    buffers = {n: t.clone() for n, t in dense_file["buffers"].items()}
    return params, buffers, meta
