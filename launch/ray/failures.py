"""A failed Ray Train job as one :class:`~turnout.errors.WorkerError` for the user.

Which rank's failure is the cause (not the peers whose collectives broke because it went
away), a crash without a record of ours as one line pointing at the log folder, and the
note that restarts did not help. Which failures may be restarted at all is
:mod:`turnout.launch.ray.restarts`.
"""

from __future__ import annotations

from pathlib import Path

from turnout.errors import WorkerError, one_line
from turnout.launch.ray.restarts import CollectiveWorkerError, FinalWorkerError


def _crash_line(error: BaseException) -> str:
    """One line for an error that is not ours; Ray's remote errors carry traceback text."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    if lines and lines[0].startswith("Traceback (most recent call last)"):
        return lines[-1]
    return one_line(error)


def find_worker_error(exc: BaseException, log_dir: Path) -> WorkerError:
    """The failure behind Ray's TrainingFailedError, as a :class:`WorkerError`.

    A worker that raised hands back its own record (the lowest such rank wins: when
    every rank stops together, rank 0 speaks). A worker that died without one (killed,
    out of memory) or a failing Ray Train controller becomes a 'crash' pointing at the
    run's log folder; a dead worker is named rather than the peers whose collectives
    failed because it went away. A final failure (turnout.launch.ray.restarts) arrives as
    the controller's failure.
    """
    cause = getattr(exc, "controller_failure", None)
    if isinstance(cause, WorkerError):  # a final failure, raised by StopOnFinalError
        return cause
    failures: dict[int, BaseException] = getattr(exc, "worker_failures", None) or {}
    records = {r: e for r, e in failures.items() if isinstance(e, WorkerError)}
    crashes = {r: e for r, e in failures.items() if r not in records}
    # A peer's failed collective is the echo of a worker that died: name the dead one.
    causes = {r: e for r, e in records.items() if not isinstance(e, CollectiveWorkerError)} or (
        {} if crashes else records
    )
    if causes:
        return causes[min(causes)]
    if crashes:
        rank = min(crashes)
        return WorkerError("crash", _crash_line(crashes[rank]), rank, log=str(log_dir))
    message = f"Ray Train controller: {one_line(cause)}" if cause else one_line(exc)
    return WorkerError("crash", message, -1, log=str(log_dir))


def gave_up(error: WorkerError, max_failures: int) -> WorkerError:
    """``error`` saying that restarts did not help (or were off), unless it is final."""
    if isinstance(error, FinalWorkerError):
        return error
    if max_failures == 0:
        why = "no restart: launch.max_failures=0"
    else:
        why = f"after {max_failures} restart(s), launch.max_failures={max_failures}"
    return WorkerError(error.kind, f"{error.message} ({why})", error.rank, error.key, error.log)
