"""The launcher's hold on the MLflow run: opened before any worker starts, ended honestly.

:func:`open_tracked_run` opens the run (a new one, or the one the ``train.resume``
checkpoint recorded; see :mod:`turnout.trainer.tracking.store`) on the launcher, so an
unreachable store is one line naming ``tracking.uri`` before Ray starts, and returns
its id, which the workers get: rank 0 attaches to that run and only logs.
:meth:`TrackedRun.end` marks it FINISHED, FAILED (any failure, a killed worker
included) or KILLED (Ctrl-C, SIGTERM: tagged ``stop_reason``), waiting a bounded time
for the store.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from turnout.config import TurnoutConfig
from turnout.errors import RunError
from turnout.redact import redact

#: How long the launcher waits for the store to take the run's final status.
END_TIMEOUT_S = 15.0


@dataclass
class TrackedRun:
    uri: str
    run_id: str
    """'' when tracking is off."""

    def end(self, status: str, tags: dict[str, str] | None = None) -> None:
        """Mark the run ``status`` (after setting ``tags``); a store that does not answer
        costs one warning line."""
        if not self.run_id:
            return
        from turnout.trainer.tracking.store import end_run

        why = end_run(self.uri, self.run_id, status, END_TIMEOUT_S, tags)
        if why:
            print(
                f"turnout: warning: could not mark MLflow run {self.run_id} {status}: "
                f"{redact(why)}",
                file=sys.stderr,
                flush=True,
            )


def open_tracked_run(cfg: TurnoutConfig) -> TrackedRun:
    """Open the job's MLflow run on the launcher (run_id '' when tracking is off)."""
    if not cfg.tracking.enabled:
        return TrackedRun(cfg.tracking.uri, "")
    from turnout.trainer.tracking.store import open_run

    try:
        run_id = open_run(cfg, cfg.launch.num_workers)
    except RunError:
        raise
    except Exception as e:  # an unreachable server, a store that refuses us
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RunError(
            f"cannot open the MLflow store {cfg.tracking.uri!r}: {first}", key="tracking.uri"
        ) from None
    return TrackedRun(cfg.tracking.uri, run_id)
