"""Graceful stops: who asked this job to stop, and the request every rank agrees on.

A stop is asked for in one of two ways:

- the **launcher** (``turnout train`` got SIGTERM or Ctrl-C) writes :data:`STOP_FILE`
  into the job's checkpoint run folder (:func:`request_stop`); rank 0 looks for it
  before each micro step's finite-loss reduction (one ``stat``);
- a **worker process** gets SIGTERM itself (a preempted node, ``kill`` by hand): the
  handler :func:`install_handlers` put in place on the process's main thread sets a flag.

Neither decides alone. Each rank puts what it saw into the finite-loss all-reduce
every micro step already makes (:func:`turnout.trainer.step.agree_finite`: world + 1
more float64 slots, no extra collective), so every rank learns the same
:class:`StopVote` after the same step, finishes it, and the loop checkpoints and
leaves. A stop the launcher asked for ends the job; one a worker asked for alone
(the launcher did not) is a preemption the launcher's recovery restarts from that
checkpoint (:class:`PreemptedError`).
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass
from pathlib import Path

#: The launcher's stop request in a checkpoint run folder: its text is the reason.
STOP_FILE = "stop"

#: Set by this process's signal handler (SIGTERM to a worker); read by the loop.
_signalled = threading.Event()
_signal_name: list[str] = []


def request_stop(run_dir: Path, reason: str) -> None:
    """The launcher: ask every rank of the job training into ``run_dir`` to stop."""
    from turnout.files import write_atomic

    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / STOP_FILE, reason + "\n")


def stop_requested(run_dir: Path | None) -> str:
    """The launcher's reason when it asked ``run_dir``'s job to stop, else ''."""
    if run_dir is None:
        return ""
    try:
        return (run_dir / STOP_FILE).read_text(errors="replace").strip() or "stop"
    except OSError:
        return ""


def clear_stop(run_dir: Path) -> None:
    """Forget an old request (a job resumed into the same folder trains again)."""
    (run_dir / STOP_FILE).unlink(missing_ok=True)


def _on_signal(signum: int, _frame: object) -> None:
    _signal_name[:] = [signal.Signals(signum).name]
    _signalled.set()


def install_handlers(signals: tuple[int, ...] = (signal.SIGTERM,)) -> bool:
    """On a worker's main thread: turn ``signals`` into a stop request of this process.

    Installed after Ray's own handlers (a Python one that exits at once and abseil's
    C++ one that dumps a stack and aborts 3 s later), it replaces both. False (nothing
    installed) off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return False
    for signum in signals:
        signal.signal(signum, _on_signal)
    return True


def signalled() -> str:
    """The signal this process was asked to stop by ('SIGTERM'), or ''."""
    return _signal_name[0] if _signalled.is_set() and _signal_name else ""


@dataclass(frozen=True)
class StopVote:
    """What every rank agreed on after a step (the same on every rank)."""

    launcher: bool = False
    """The launcher asked the job to stop (its run folder holds :data:`STOP_FILE`)."""
    signalled_ranks: tuple[int, ...] = ()
    """Ranks whose own process got SIGTERM."""

    @property
    def stop(self) -> bool:
        return self.launcher or bool(self.signalled_ranks)

    @property
    def preempted(self) -> bool:
        """Workers were signalled and the launcher was not: the job must go on."""
        return bool(self.signalled_ranks) and not self.launcher

    def reason(self) -> str:
        if self.launcher:
            return "the launcher was signalled"
        ranks = ", ".join(str(r) for r in self.signalled_ranks)
        return f"SIGTERM to rank(s) {ranks}"


class PreemptedError(RuntimeError):
    """Every rank stopped after ``step`` and checkpointed because a worker process was
    SIGTERMed (a preempted node): the launcher restarts the job from that checkpoint.
    Not final (``turnout.launch.ray.restarts``): a restart is the point."""

    def __init__(self, step: int, reason: str, checkpoint: str) -> None:
        super().__init__(
            f"preempted: {reason}; every rank stopped after step {step} and saved {checkpoint}"
        )
        self.step = step
        self.reason = reason
        self.checkpoint = checkpoint

    def __reduce__(self) -> tuple[type[PreemptedError], tuple[int, str, str]]:
        return (type(self), (self.step, self.reason, self.checkpoint))
