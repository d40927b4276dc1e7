"""The launcher's hold on the MLflow run: opened before any worker starts, ended honestly.

:func:`open_tracked_run` opens the run (a new one, or the one the ``train.resume``
checkpoint recorded; see :mod:`turnout.trainer.tracking_store`) on the launcher, so an
unreachable store is one line naming ``tracking.uri`` before Ray starts, and returns
the config the workers get, with ``tracking.run_id`` set: rank 0 attaches to that run
and only logs. :meth:`TrackedRun.end` marks it FINISHED, FAILED (any failure, a killed
worker included) or KILLED (Ctrl-C), waiting a bounded time for the store.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass

from turnout.config import TurnoutConfig
from turnout.errors import RunError

#: How long the launcher waits for the store to take the run's final status.
END_TIMEOUT_S = 15.0


@dataclass
class TrackedRun:
    uri: str
    run_id: str
    """'' when tracking is off."""

    def end(self, status: str) -> None:
        """Mark the run ``status``; a store that does not answer costs one warning line."""
        if not self.run_id:
            return
        from turnout.trainer.tracking_store import end_run

        why = end_run(self.uri, self.run_id, status, END_TIMEOUT_S)
        if why:
            print(
                f"turnout: warning: could not mark MLflow run {self.run_id} {status}: {why}",
                file=sys.stderr,
                flush=True,
            )


def open_tracked_run(cfg: TurnoutConfig) -> tuple[TurnoutConfig, TrackedRun]:
    """Open the job's MLflow run on the launcher; the workers' config names it."""
    if not cfg.tracking.enabled:
        return cfg, TrackedRun(cfg.tracking.uri, "")
    from turnout.trainer.tracking_store import open_run

    try:
        run_id = open_run(cfg, cfg.launch.num_workers)
    except RunError:
        raise
    except Exception as e:  # an unreachable server, a store that refuses us
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RunError(
            f"cannot open the MLflow store {cfg.tracking.uri!r}: {first}", key="tracking.uri"
        ) from None
    out = copy.deepcopy(cfg)
    out.tracking.run_id = run_id
    return out, TrackedRun(cfg.tracking.uri, run_id)
