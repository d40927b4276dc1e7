"""A checkpoint's manifest: every file's size and sha256, written last.

``manifest.json`` in a step folder lists each file of the checkpoint (relative path,
bytes, sha256). It is written after every other file, and before the folder is renamed
from its hidden temporary tag, so a step folder with a manifest is a finished save,
and its files can be checked against what was written: a truncated or overwritten
file, a missing expert slice, or a stray partial copy is named before any worker loads
anything (:func:`verify`, run by the resume preflight on the launcher).

Hashing reads every file once more. Each rank hashes the files it wrote itself, right
after writing them (still in the page cache, and in parallel across ranks); rank 0
hashes the rest and writes the manifest. :func:`verify` reads every file once on the
launcher; at turnout's model sizes that is seconds.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from turnout.errors import CheckpointError
from turnout.files import write_atomic

MANIFEST = "manifest.json"
VERSION = 1
_CHUNK = 1 << 20


def file_entry(path: Path) -> dict[str, Any]:
    """``{'bytes': size, 'sha256': hex}`` of one file."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": digest.hexdigest()}


def _files(folder: Path) -> list[str]:
    """Every file under ``folder`` but the manifest, as sorted relative POSIX paths."""
    out = [
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST
    ]
    return sorted(out)


def write(folder: Path, known: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write ``folder/manifest.json`` for the files now in ``folder``; returns its path.

    ``known``: entries other ranks already computed for the files they wrote (by relative
    path); every other file is hashed here. Written atomically (temporary + rename)."""
    known = known or {}
    entries = {name: known.get(name) or file_entry(folder / name) for name in _files(folder)}
    path = folder / MANIFEST
    write_atomic(path, json.dumps({"version": VERSION, "files": entries}, indent=1) + "\n")
    return path


def read(folder: Path) -> dict[str, dict[str, Any]]:
    """The manifest's file table; CheckpointError (naming the file) if absent or unreadable."""
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(
            f"{folder} has no {MANIFEST}: the save did not finish (or an older turnout wrote "
            "it); resume from another step folder"
        )
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
        files = data["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not a table")
    except Exception as e:  # noqa: BLE001 - any damage is one line naming the file
        raise CheckpointError(f"{path} is damaged: {type(e).__name__}: {e}") from None
    return files


def verify(folder: Path) -> None:
    """Check every file the manifest lists: present, its size, its sha256.

    Raises CheckpointError naming the first bad file (in the manifest's order)."""
    for name, want in read(folder).items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing (listed in {folder / MANIFEST})")
        size = path.stat().st_size
        if size != want.get("bytes"):
            raise CheckpointError(
                f"{path} has {size} bytes, the manifest says {want.get('bytes')}: "
                "truncated or replaced"
            )
        if file_entry(path)["sha256"] != want.get("sha256"):
            raise CheckpointError(f"{path} does not match its sha256 in {folder / MANIFEST}")


def is_complete(folder: Path) -> bool:
    """Cheap: the folder has a readable manifest and every listed file has its size."""
    try:
        files = read(folder)
    except CheckpointError:
        return False
    for name, want in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != want.get("bytes"):
            return False
    return True


def total_bytes(folder: Path) -> int:
    """The bytes of every file the manifest lists (0 when it has none or is unreadable)."""
    try:
        files = read(folder)
    except CheckpointError:
        return 0
    return sum(int(v.get("bytes", 0)) for v in files.values() if isinstance(v, dict))
