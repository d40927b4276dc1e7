"""MLflow system metrics (CPU, memory, disk, network, GPU where present), one sampler per node.

The first process of each node (LOCAL_RANK 0) runs MLflow's ``SystemMetricsMonitor``
for the job's run, with node id ``node<N>`` (N: the node rank Ray or torchrun gives), so
the metrics read ``system/node0/cpu_utilization_percentage`` and so on, and tags the run
``node/node<N>`` with the host name. Sampling every 10 s unless
``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` says otherwise. Everything here is best
effort on its own daemon threads: it never stops or slows training. MLflow's monitor
stops by itself when the store becomes unreachable; a supervisor starts a new one when
that happens, so the samples resume after an outage.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any

from turnout.config import TurnoutConfig

log = logging.getLogger("turnout.trainer")

SAMPLING_INTERVAL_S = 10.0
_STOP_WAIT_S = 5.0


def node_rank() -> int:
    """This process's node rank: NODE_RANK (turnout's Ray backend), GROUP_RANK (torchrun)."""
    for name in ("NODE_RANK", "GROUP_RANK"):
        try:
            return int(os.environ[name])
        except (KeyError, ValueError):
            continue
    return 0


def node_id() -> str:
    return f"node{node_rank()}"


def _sampling_interval() -> float:
    try:
        return float(os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", SAMPLING_INTERVAL_S))
    except ValueError:
        return SAMPLING_INTERVAL_S


class SystemMetrics:
    """The node's system-metrics sampler for ``run_id`` (inactive where it does not apply).

    MLflow's monitor thread ends for good the first time it cannot reach the store. A
    supervisor thread checks it every sampling interval and starts a fresh monitor once
    the old one has ended (MLflow continues the series from the store's last step), so
    the samples resume when a tracking outage is over.
    """

    def __init__(self, cfg: TurnoutConfig, run_id: str) -> None:
        self._monitor: Any = None
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        t = cfg.tracking
        local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        if not (t.enabled and t.system_metrics and run_id and local_rank == 0):
            return
        try:
            from turnout.trainer.tracking.store import client_for
            from turnout.trainer.tracking.uri import local_sqlite_uri

            self._uri = local_sqlite_uri(t.uri)
            self._run_id = run_id
            client = client_for(self._uri)
            self._monitor = self._start_monitor()
        except Exception as e:  # psutil missing, a store hiccup: no system metrics
            log.warning("turnout: no MLflow system metrics for this node: %s", e)
            self._monitor = None
            return
        host = socket.gethostname()

        def _tag() -> None:
            try:
                client.set_tag(run_id, f"node/{node_id()}", host)
            except Exception as e:
                log.debug("node tag not set: %s", e)

        threading.Thread(target=_tag, name="turnout-node-tag", daemon=True).start()
        threading.Thread(
            target=self._supervise, name="turnout-sysmetrics-watch", daemon=True
        ).start()

    def _start_monitor(self) -> Any:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(
            self._run_id,
            sampling_interval=_sampling_interval(),
            node_id=node_id(),
            tracking_uri=self._uri,
        )
        monitor.start()
        return monitor

    def _supervise(self) -> None:
        """Start a fresh monitor whenever the current one's thread has ended (best effort).

        Starting may wait on an unreachable store, so it runs outside the lock; a
        :meth:`stop` meanwhile is honoured by finishing the new monitor at once."""
        interval = max(_sampling_interval(), 0.5)
        while not self._stopped.wait(interval):
            with self._lock:
                thread = getattr(self._monitor, "_process", None)
                if self._monitor is None or (thread is not None and thread.is_alive()):
                    continue
            try:
                fresh = self._start_monitor()
            except Exception as e:  # still down: try again next interval
                log.debug("system metrics not restarted yet: %s", e)
                continue
            with self._lock:
                if not self._stopped.is_set():
                    self._monitor, fresh = fresh, None
            if fresh is not None:
                fresh.finish()

    def stop(self) -> None:
        """Stop sampling, waiting a few seconds at most for the last batch to be sent."""
        self._stopped.set()
        with self._lock:
            monitor, self._monitor = self._monitor, None
        if monitor is None:
            return
        stopper = threading.Thread(target=monitor.finish, name="turnout-sysmetrics", daemon=True)
        stopper.start()
        stopper.join(_STOP_WAIT_S)
