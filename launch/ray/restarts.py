"""Which worker failures Ray Train may restart the job for, and which end it at once.

Ray Train v2 retries every worker-group failure up to ``FailureConfig.max_failures``
(``launch.max_failures``): a dead worker, and just as well an exception the training
function raised. A restart helps when a process or node went away; it does not help a
failure the training itself makes, which would come back at the same step on every
attempt. So the worker marks those as :class:`FinalWorkerError` (see
:func:`is_final`), and :class:`StopOnFinalError`, a Ray Train callback running in Ray's
controller, fails the run the moment one appears: Ray treats an error raised by a
callback as a controller failure, which it does not retry, and hands it to the driver
as ``ControllerError.controller_failure``.

Not final either: :class:`~turnout.trainer.stop.PreemptedError`, raised by every rank
after the checkpoint when a worker process was SIGTERMed (a preempted node): the restart
resumes from that checkpoint with nothing to train again.

Final: turnout's own errors (a config error only a worker could find, a checkpoint that
does not load, an unreachable tracking store), a non-finite loss, too many skipped
steps, a kernel mismatch under ``TURNOUT_KERNELS=1``. Not final: a collective that
failed because a peer went away (:class:`~turnout.parallel.dist.CollectiveError`),
and anything else that is not ours (a killed process, out of memory, a library error).
A bug raising a foreign exception is retried ``launch.max_failures`` times before the
job fails with its line; the budget is small.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from turnout.errors import TurnoutError, WorkerError


class FinalWorkerError(WorkerError):
    """A worker failure a restart would only repeat (see the module doc)."""


class CollectiveWorkerError(WorkerError):
    """A worker's record of a failed collective (a
    :class:`~turnout.parallel.dist.CollectiveError`): often the echo of a peer that died,
    so the driver names the dead worker when there is one. Never final."""


def is_final(error: BaseException) -> bool:
    """Whether a restart would only meet ``error`` again (see the module doc)."""
    from turnout.models.kernels import KernelMismatchError
    from turnout.parallel.dist import CollectiveError
    from turnout.trainer.skips import SkippedStepsError
    from turnout.trainer.step import NonFiniteLossError

    if isinstance(error, CollectiveError):
        return False
    return isinstance(
        error, TurnoutError | NonFiniteLossError | SkippedStepsError | KernelMismatchError
    )


def worker_failure(error: BaseException, rank: int, log_dir: Path) -> WorkerError:
    """``error`` raised on worker ``rank`` as the record the driver gets (final or not),
    its traceback written to ``log_dir``."""
    from turnout.launch.worker import worker_error
    from turnout.parallel.dist import CollectiveError

    record = worker_error(error, rank, log_dir)
    fields = (record.kind, record.message, record.rank, record.key, record.log)
    if isinstance(error, CollectiveError):
        return CollectiveWorkerError(*fields)
    if is_final(error) and not isinstance(record, FinalWorkerError):
        return FinalWorkerError(*fields)
    return record


def stop_on_final_callback() -> Any:
    """A Ray Train v2 ``UserCallback`` that fails the run on a :class:`FinalWorkerError`
    (None on a Ray Train without v2 callbacks)."""
    try:
        from ray.train.v2.api.callback import UserCallback
    except ImportError:
        return None

    class StopOnFinalError(UserCallback):
        def after_exception(self, run_context: Any, worker_exceptions: dict) -> None:
            final = {r: e for r, e in worker_exceptions.items() if isinstance(e, FinalWorkerError)}
            if final:
                raise final[min(final)]

    return StopOnFinalError()
