"""Child processes that do not outlive the process that started them.

Linux only (elsewhere a no-op): :func:`die_with_parent` runs in the child between fork
and exec and asks the kernel to send it SIGTERM when its parent dies. The launcher's
torchrun and a sweep trial's ``turnout train`` use it, so a killed driver (a sweep
SIGKILLed with its session, a lost Ray worker) leaves no training behind: each level
turns the SIGTERM into a clean stop of the level below.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal

#: prctl(2) option: the signal a child gets when its parent dies.
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """``preexec_fn``: SIGTERM this child when its parent process dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
