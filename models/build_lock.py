"""One csrc/ kernel build at a time per build folder, and never a wait without end.

``torch.utils.cpp_extension.load`` guards a build with torch's ``FileBaton``: a file
``<build folder>/lock`` created exclusively and removed when the build ends. A build
killed in between (Ctrl-C during the first ``make train``, SIGKILL, a preempted node)
leaves it behind, and every later load on that machine waits on it forever, printing
nothing. So :mod:`turnout.models.kernels` takes our own lock around the build first,
``<build folder>/turnout-build.lock`` (:func:`build_lock`):

- It is an ``flock(2)`` on that file: the kernel releases it when its holder dies, however
  it dies, so our lock never outlives its owner and nobody has to guess whether it is
  stale (no pid-file race between two processes breaking the same lock).
- The holder writes its owner record into the file (pid, host, start time) and clears
  it when its build ends. A record the next holder finds is a build that was interrupted:
  one warning names its owner.
- Under our lock, torch's ``lock`` is a leftover when no process holds it open (torch's
  baton keeps its file open while it builds; ``/proc/<pid>/fd`` on this machine tells):
  it is removed (in that warning). One that a live process holds (a build by a process
  without our lock: an older turnout, a foreign caller of the same extension name) is
  waited on instead, never removed under it.
- A lock a live process holds (another rank compiling on this machine) is waited on,
  with one line naming the owner, for at most ``TURNOUT_KERNEL_BUILD_WAIT_S`` seconds
  (default 600: a CUDA build on a slow machine takes minutes), both waits together. Past
  that, :class:`BuildLockTimeout` is raised, and the kernel loader goes on with the
  reference ops (one warning). Nothing waits without end.

A filesystem without locks (``ENOLCK``, ``EOPNOTSUPP``: some network mounts) gets no lock
of ours: torch's own baton as before. Without ``/proc`` (not Linux) torch's ``lock`` is
removed only after an interrupted build of ours. A baton held on another machine sharing
the folder looks unheld here: builds sharing a cache across machines should all be
turnout's, whose lock is an ``flock`` the shared filesystem arbitrates.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not POSIX: torch's baton only
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = "turnout-build.lock"
TORCH_LOCK = "lock"
"""The file torch.utils.file_baton.FileBaton creates in the build folder."""
WAIT_ENV = "TURNOUT_KERNEL_BUILD_WAIT_S"
DEFAULT_WAIT_S = 600.0
_POLL_S = 0.2
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS}


class BuildLockTimeout(RuntimeError):
    """Another process still builds the kernels after the longest wait allowed."""


def wait_seconds() -> float:
    """``TURNOUT_KERNEL_BUILD_WAIT_S`` (default 600); ValueError naming it if malformed."""
    raw = os.environ.get(WAIT_ENV, "").strip()
    if not raw:
        return DEFAULT_WAIT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not (0 <= value < float("inf")):
        raise ValueError(f"{WAIT_ENV} must be a number of seconds >= 0, got {raw!r}")
    return value


def _owner() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}


def _describe(owner: dict[str, Any]) -> str:
    """'pid 123 on host h, since 14:02:11 UTC' (what is known of it)."""
    parts = [f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}"]
    started = owner.get("started")
    if isinstance(started, int | float):
        when = _dt.datetime.fromtimestamp(started, _dt.timezone.utc)
        parts.append(f"started {when:%Y-%m-%d %H:%M:%S} UTC")
    return ", ".join(parts)


def _read(fd: int) -> dict[str, Any]:
    """The owner record in the lock file ({} if none or unreadable)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        record = json.loads(os.read(fd, 4096).decode("utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _alive(owner: dict[str, Any]) -> str:
    """'still running' / 'no longer running' for an owner on this host; '' elsewhere."""
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return ""
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return "no longer running"
    except PermissionError:
        return "still running"
    return "still running"


def _torch_lock_holders(path: Path) -> list[int] | None:
    """Pids of the other processes on this machine that hold ``path`` open (torch's baton
    keeps its file open while it builds); None where ``/proc`` cannot tell."""
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    target = os.path.realpath(path)
    holders = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if any(os.readlink(fd) == target for fd in (entry / "fd").iterdir()):
                holders.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return holders


def _settle_torch_lock(
    build_dir: Path, previous: dict[str, Any], deadline: float, wait_s: float
) -> None:
    """Under our lock: remove torch's ``lock`` when no process holds it (a leftover),
    wait (bounded) while one does (a build by a process without our lock, e.g. an older
    turnout); one warning names an interrupted build."""
    torch_lock = build_dir / TORCH_LOCK
    removed, said = False, False
    while torch_lock.exists():
        holders = _torch_lock_holders(torch_lock)
        if holders == [] or (holders is None and previous):
            with contextlib.suppress(FileNotFoundError):
                torch_lock.unlink()
            removed = True
            break
        who = f"pid {', '.join(map(str, holders))}" if holders else "a process"
        said = _wait_a_little(
            said,
            deadline,
            wait_s,
            f"torch's build lock {torch_lock} (held by {who})",
            f"torch's build lock {torch_lock}, held by {who}, is still there",
        )
    if previous:
        state = _alive(previous)
        what = (
            f"a csrc/ kernel build in {build_dir} was interrupted (by {_describe(previous)}"
            + (f", {state})" if state else ")")
            + ("; removed torch's leftover lock" if removed else "")
        )
    elif removed:
        what = f"removed torch's leftover build lock {torch_lock} (no process holds it)"
    else:
        return
    warnings.warn(f"turnout: {what}", RuntimeWarning, stacklevel=4)


def _wait_a_little(said: bool, deadline: float, wait_s: float, what: str, late: str) -> bool:
    """One turn of a bounded wait for ``what``: :class:`BuildLockTimeout` (``late``, then
    the bound) once ``deadline`` has passed, one line the first time, then a short sleep.
    Returns True: the line has been said."""
    if time.monotonic() >= deadline:
        raise BuildLockTimeout(f"{late} after {wait_s:g} s ({WAIT_ENV})")
    if not said:
        print(
            f"turnout: waiting for {what} to finish; at most {wait_s:g} s ({WAIT_ENV})",
            file=sys.stderr,
            flush=True,
        )
    time.sleep(min(_POLL_S, max(0.0, deadline - time.monotonic())))
    return True


@contextlib.contextmanager
def build_lock(build_dir: Path, wait_s: float | None = None) -> Iterator[None]:
    """Hold the build lock of ``build_dir`` inside (see the module doc); waits at most
    ``wait_s`` seconds (default :func:`wait_seconds`) for a live holder, then raises
    :class:`BuildLockTimeout`."""
    wait_s = wait_seconds() if wait_s is None else wait_s
    deadline = time.monotonic() + wait_s
    build_dir.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    fd = os.open(build_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if not _acquire(fd, build_dir, deadline, wait_s):
            yield  # no locks on this filesystem: torch's baton alone
            return
        try:
            _settle_torch_lock(build_dir, _read(fd), deadline, wait_s)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(_owner()).encode(), 0)
            yield
        finally:
            os.ftruncate(fd, 0)  # a clean end leaves no owner behind
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _acquire(fd: int, build_dir: Path, deadline: float, wait_s: float) -> bool:
    """Take the flock (True), or False when the filesystem has none; waits for a live
    holder until ``deadline``, saying so once, then BuildLockTimeout."""
    assert fcntl is not None
    said = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno in _NO_LOCKS:
                return False
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
        owner, where = _describe(_read(fd)), build_dir / LOCK_FILE
        said = _wait_a_little(
            said,
            deadline,
            wait_s,
            f"the csrc/ kernel build by {owner} ({where})",
            f"the build by {owner} still holds {where}",
        )
