"""What a full, read-only or forbidden disk does to a checkpoint write.

Some write failures come back on every try: no space left (``ENOSPC``), a quota
(``EDQUOT``), a read-only filesystem (``EROFS``), no permission (``EACCES``, ``EPERM``), a
file larger than the filesystem or the process's ``ulimit -f`` allows (``EFBIG``). Ray's
restarts (``launch.max_failures``) would only meet them again, so :func:`disk_error` turns
them into a :class:`~turnout.errors.DiskError` (a final failure: not retried, see
:mod:`turnout.launch.ray.restarts`) whose one line names the path, the bytes the
checkpoint needs and the space free there. Any other ``OSError`` is left as it is.

The bytes needed are estimated before writing: the state about to be written (every
tensor's bytes, :func:`state_bytes`), or the run folder's newest complete checkpoint when
that is larger (it also counts the config and the tokenizer). :func:`warn_if_short` says,
once per run folder and in one line, when the free space is below that: before a
checkpoint is written, and after one (the next will need as much again).

Checkpoint files go through Python file objects (:func:`save_tensors`): ``torch.save``
given a path writes from C++ and reports a full disk as a ``RuntimeError`` without its
errno; through a file object the ``OSError`` (``ENOSPC``) is raised, and then torch's
zip writer, closing, raises a ``RuntimeError`` while handling it: :func:`writing` looks
through that chain for the ``OSError``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from turnout.errors import DiskError

log = logging.getLogger("turnout.trainer")

#: errno -> what it means, for the errors no retry can fix.
UNFIXABLE: dict[int, str] = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "file too large for the filesystem or the file-size limit (ulimit -f)",
}
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_MB = 1e6
# Run folders already warned about (a per-process "said once" record, like warnings').
_warned: set[Path] = set()


def free_bytes(path: Path) -> int | None:
    """Free bytes on the filesystem holding ``path`` (its nearest existing folder)."""
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def size_text(n: float) -> str:
    """Bytes for a reader: MB from 0.1 MB up, else bytes."""
    return f"{n / _MB:.1f} MB" if n >= 100_000 else f"{int(n)} bytes"


def disk_error(
    error: OSError, path: Path, needed: int, what: str = "the checkpoint"
) -> DiskError | None:
    """``error`` (raised writing ``path``) as one line, if no retry can fix it; else None.

    ``needed``: the bytes ``what`` (the whole checkpoint, or one small file) needs."""
    reason = UNFIXABLE.get(error.errno or 0)
    if reason is None:
        return None
    name = errno.errorcode.get(error.errno or 0, str(error.errno))
    where = Path(error.filename) if error.filename else path
    free = free_bytes(where)
    room = f" and {size_text(free)} free there" if free is not None else ""
    if error.errno in _FULL:
        hint = "free space, keep fewer checkpoints (train.keep_checkpoints) or choose another"
    else:
        hint = "make it writable or choose another"
    return DiskError(
        f"{reason} ({name}) writing {where}: {what} needs about {size_text(needed)}{room}; "
        f"the previous complete checkpoint is kept; {hint} train.ckpt_dir"
    )


@contextmanager
def writing(path: Path, needed: int, what: str = "the checkpoint") -> Iterator[None]:
    """Turn an unfixable ``OSError`` raised inside into a :class:`DiskError` naming
    ``path`` (or the file the error names) and the ``needed`` bytes of ``what``."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        cause = _os_error(e)
        error = disk_error(cause, path, needed, what) if cause is not None else None
        if error is None:
            raise
        raise error from None


def _os_error(error: BaseException | None) -> OSError | None:
    """The ``OSError`` behind ``error``: itself, or one it was raised while handling
    (``torch.save`` closing its zip writer after a failed write raises a
    ``RuntimeError`` of its own on top of the ``OSError``)."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, OSError):
            return error
        error = error.__cause__ or error.__context__
        seen += 1
    return None


def save_tensors(obj: Any, path: Path, needed: int) -> None:
    """``torch.save(obj)`` to ``path`` through a file object (see the module doc); a
    failed write removes what it wrote."""
    with writing(path, needed):
        try:
            with open(path, "wb") as f:
                torch.save(obj, f)
        except BaseException:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
            raise


def state_bytes(*states: Mapping[str, Any]) -> int:
    """Bytes of every tensor in (nested) mappings: what ``torch.save`` will write, give
    or take its small headers."""
    total = 0
    for state in states:
        for value in state.values():
            if isinstance(value, torch.Tensor):
                total += value.numel() * value.element_size()
            elif isinstance(value, Mapping):
                total += state_bytes(value)
    return total


def warn_if_short(run_dir: Path, needed: int, what: str) -> bool:
    """Warn (once per run folder, one line) when ``run_dir``'s filesystem has less than
    ``needed`` bytes free; ``what`` names the checkpoint. True when it warned now."""
    free = free_bytes(run_dir)
    key = run_dir.resolve()
    if free is None or free >= needed or key in _warned:
        return False
    _warned.add(key)
    log.warning(
        "turnout: warning: %s needs about %s and %s has %s free: it will not fit "
        "(free space, or keep fewer checkpoints with train.keep_checkpoints)",
        what,
        size_text(needed),
        run_dir,
        size_text(free),
    )
    return True
