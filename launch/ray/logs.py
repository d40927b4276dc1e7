"""What the driver prints of a Ray job: the training workers' lines, and nothing of Ray's.

Ray's driver-side log printer is swapped for :class:`WorkerLogPrinter`, which forwards
only the Ray Train workers' output, without Ray's ``(RayTrainWorker pid=...)`` prefixes
and Ray's own chatter. ``TURNOUT_RAY_VERBOSE=1`` keeps Ray's normal output.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

# Lines Ray's (and DeepSpeed's) machinery prints from inside a training worker.
_RAY_NOISE = (
    "Setting up process group for",
    "Reporting training result",
    "[repeated",
    "core_worker.cc",
    "Started distributed worker processes",
    "deepspeed_shm_comm_op built successfully",
    # c10d, when a peer on another node has no reverse-DNS name: harmless.
    "The hostname of the client socket cannot be retrieved",
)


# How often a progress bar is echoed when the driver's stderr is not a terminal.
_BAR_EVERY_S = 10.0


def verbose() -> bool:
    return os.environ.get("TURNOUT_RAY_VERBOSE", "") not in ("", "0")


class WorkerLogPrinter:
    """Ray log handler: print the training workers' lines, unprefixed; drop the rest.

    A tqdm bar arrives as chunks of ``\\r``-separated redraws. On a terminal the latest
    redraw replaces the bar in place; otherwise one redraw every ``_BAR_EVERY_S``
    seconds (and the last) is printed as a plain line.
    """

    def __init__(self) -> None:
        self.skipping = False
        self.bar_open = False
        self.last_bar_t = 0.0
        self.pending_bar = ""

    def __call__(self, data: dict[str, Any]) -> None:
        name = data.get("actor_name") or data.get("task_name") or ""
        if "RayTrainWorker" not in name:
            return
        sink = sys.stderr if data.get("is_err") else sys.stdout
        for line in data.get("lines", []):
            # Ray Train logs a failed worker's traceback; the driver reports it in one line.
            if line.startswith("Error in training function"):
                self.skipping = True
            if self.skipping:
                self.skipping = bool(line.strip())
                continue
            if any(tag in line for tag in _RAY_NOISE):
                continue
            if "\r" in line:
                redraws = [seg.rstrip() for seg in line.split("\r") if seg.strip()]
                if redraws:
                    self._bar(redraws[-1])
                continue
            self._line(line, sink)

    def _bar(self, text: str) -> None:
        if sys.stderr.isatty():
            sys.stderr.write("\r\x1b[K" + text)
            sys.stderr.flush()
            self.bar_open = True
            return
        now = time.monotonic()
        self.pending_bar = text
        if now - self.last_bar_t >= _BAR_EVERY_S:
            self.flush_bar()

    def flush_bar(self) -> None:
        if self.pending_bar:
            print(self.pending_bar, file=sys.stderr, flush=True)
            self.pending_bar = ""
            self.last_bar_t = time.monotonic()

    def _line(self, line: str, sink: Any) -> None:
        if self.bar_open:
            sys.stderr.write("\r\x1b[K")
            self.bar_open = False
        print(line, file=sink, flush=True)

    def close(self) -> None:
        self.flush_bar()
        if self.bar_open:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.bar_open = False


printer = WorkerLogPrinter()


def quiet_ray_output() -> None:
    """Swap Ray's driver-side log printer for :class:`WorkerLogPrinter`."""
    if verbose():
        return
    try:
        from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # a Ray without this hook: keep its default printer
        return
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("turnout_worker_logs", printer)
