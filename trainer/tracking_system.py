"""MLflow system metrics (CPU, memory, disk, network, GPU where present), one sampler per node.

The first process of each node (LOCAL_RANK 0) runs MLflow's ``SystemMetricsMonitor``
for the job's run, with node id ``node<N>`` (N: the node rank Ray or torchrun gives), so
the metrics read ``system/node0/cpu_utilization_percentage`` and so on, and tags the run
``node/node<N>`` with the host name. Sampling every 10 s unless
``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` says otherwise. Everything here is best
effort on its own daemon thread: it never stops or slows training (MLflow's monitor
stops by itself when the store becomes unreachable).
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


class SystemMetrics:
    """The node's system-metrics sampler for ``run_id`` (inactive where it does not apply)."""

    def __init__(self, cfg: TurnoutConfig, run_id: str) -> None:
        self._monitor: Any = None
        t = cfg.tracking
        local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
        if not (t.enabled and t.system_metrics and run_id and local_rank == 0):
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            from turnout.trainer.tracking_store import client_for
            from turnout.trainer.tracking_uri import local_sqlite_uri

            uri = local_sqlite_uri(t.uri)
            client = client_for(uri)
            self._monitor = SystemMetricsMonitor(
                run_id,
                sampling_interval=SAMPLING_INTERVAL_S,
                node_id=node_id(),
                tracking_uri=uri,
            )
            self._monitor.start()
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

    def stop(self) -> None:
        """Stop sampling, waiting a few seconds at most for the last batch to be sent."""
        monitor, self._monitor = self._monitor, None
        if monitor is None:
            return
        stopper = threading.Thread(target=monitor.finish, name="turnout-sysmetrics", daemon=True)
        stopper.start()
        stopper.join(_STOP_WAIT_S)
