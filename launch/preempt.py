"""SIGTERM and Ctrl-C on the launcher: stop after a step, checkpoint, leave, exit 143.

A scheduler preempting a job (Slurm at its time limit, Kubernetes evicting a pod, a spot
instance going away) sends SIGTERM and, some seconds later, SIGKILL. :class:`DriverStop`
turns the first SIGTERM (or Ctrl-C) into a stop request in the job's run folder
(:func:`turnout.trainer.stop.request_stop`); every rank stops after the same step and
checkpoints it, the launcher marks the MLflow run KILLED with a ``stop_reason`` tag,
prints one line naming the checkpoint and the command that resumes it, shuts its Ray
down and exits 143 (130 after Ctrl-C). A second signal stops at once, as does
``launch.preempt_grace_s`` running out.

Ray installs SIGTERM handlers in the driver when it connects (a Python one that exits,
and abseil's C++ failure handler that prints a stack and aborts after 3 s, exit 134);
:meth:`DriverStop.arm` runs after ``ray.init`` and puts ours in their place.

The grace (:func:`grace_s`): ``launch.preempt_grace_s``, or when 0, sized for the model:
:data:`STEP_ALLOWANCE_S` for the step in flight plus twice the checkpoint's bytes (the
planner's) at the write speed measured in ``train.ckpt_dir`` (:func:`write_speed`). A
grace set by hand that the checkpoint alone cannot be written in is refused
(:func:`check_grace`, in the preflight).
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from turnout.config import TurnoutConfig
from turnout.errors import EXIT_INTERRUPTED, EXIT_TERMINATED, ConfigError

if TYPE_CHECKING:
    from turnout.launch.tracked_run import TrackedRun

#: Seconds the automatic grace allows for the step in flight (and leaving Ray).
STEP_ALLOWANCE_S = 30.0
#: Bytes written to measure the checkpoint folder's write speed (then fsynced, deleted).
PROBE_BYTES = 8 << 20
#: The MLflow tag that says why a run was stopped.
STOP_REASON_TAG = "stop_reason"


def _existing(folder: Path) -> Path:
    """``folder``, or its nearest ancestor that exists (same file system, most likely)."""
    folder = folder.expanduser().absolute()
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    return folder


def write_speed(folder: Path, nbytes: int = PROBE_BYTES) -> float:
    """Bytes per second of one fsynced write of ``nbytes`` into ``folder`` (or where it
    will be: nothing is created but the probe, which is deleted). A floor: the fsync's
    fixed cost weighs more on a small probe than on a checkpoint."""
    probe = _existing(folder) / f".turnout-write-probe-{os.getpid()}"
    block = os.urandom(1 << 20)
    blocks = max(1, nbytes // len(block))
    t0 = time.perf_counter()
    try:
        with open(probe, "wb") as f:
            for _ in range(blocks):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        seconds = time.perf_counter() - t0
    finally:
        probe.unlink(missing_ok=True)
    return blocks * len(block) / max(seconds, 1e-6)


def checkpoint_seconds(cfg: TurnoutConfig, bytes_per_s: float) -> tuple[int, float]:
    """(the checkpoint's bytes, seconds to write them at ``bytes_per_s``)."""
    from turnout.trainer.planner.plan import CHECKPOINT_BYTES_PER_PARAM, plan

    if cfg.data.structure:  # the planner sizes language models; count the model itself
        import torch

        from turnout.trainer.structure.model import build_model

        with torch.device("meta"):
            params = sum(p.numel() for p in build_model(cfg).parameters())
        nbytes = params * CHECKPOINT_BYTES_PER_PARAM
    else:
        nbytes = plan(cfg).checkpoint_bytes
    return nbytes, nbytes / bytes_per_s


def grace_s(cfg: TurnoutConfig, checkpoint_s: float) -> float:
    """``launch.preempt_grace_s``, or, when it is 0, the grace sized for a checkpoint that
    takes ``checkpoint_s`` seconds to write."""
    if cfg.launch.preempt_grace_s > 0:
        return float(cfg.launch.preempt_grace_s)
    return STEP_ALLOWANCE_S + 2 * checkpoint_s


def check_grace(cfg: TurnoutConfig) -> float:
    """The job's grace in seconds; ConfigError('launch.preempt_grace_s') when a grace set
    by hand is shorter than writing the checkpoint at the speed measured here."""
    speed = write_speed(Path(cfg.train.ckpt_dir))
    nbytes, need = checkpoint_seconds(cfg, speed)  # the planner runs once
    grace = grace_s(cfg, need)
    if need > grace:
        raise ConfigError(
            "launch.preempt_grace_s",
            f"{grace:g} s cannot hold the stop's checkpoint: {nbytes / 1e9:.3g} GB take about "
            f"{need:.0f} s at the {speed / 1e6:.0f} MB/s measured writing to "
            f"{cfg.train.ckpt_dir}; raise it, or set 0 to size it for the model",
        )
    return grace


def resume_command(argv: list[str]) -> str:
    """The command line that continues this job: ``argv`` with ``train.resume=auto``."""
    items = [a for a in argv if not a.startswith("train.resume=")]
    return shlex.join(["turnout", *items, "train.resume=auto"])


class Terminated(KeyboardInterrupt):
    """SIGTERM before the job runs (nothing to checkpoint): leave at once, exit 143."""

    exit_code = EXIT_TERMINATED


@dataclass
class DriverStop:
    """The launcher's answer to SIGTERM / SIGINT (see the module doc)."""

    grace_s: float
    signum: int = 0
    """The first signal received (0 = none)."""
    at: float = 0.0
    """When it came (``time.monotonic``)."""
    run_dir: Path | None = None
    _previous: dict[int, object] = field(default_factory=dict)

    def install(self) -> None:
        """Take SIGTERM and SIGINT (again after ``ray.init``); off the main thread, where
        Python cannot, the signals stay as they are."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous.setdefault(signum, signal.getsignal(signum))
            signal.signal(signum, self._on_signal)

    def arm(self, run_dir: Path) -> None:
        """From here a signal asks the job training into ``run_dir`` to stop."""
        self.run_dir = run_dir
        self.install()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum or self.run_dir is None:  # a second signal, or no job yet: now
            self.signum = self.signum or signum
            raise Terminated if self.signum == signal.SIGTERM else KeyboardInterrupt
        from turnout.trainer.stop import request_stop

        self.signum, self.at = signum, time.monotonic()
        request_stop(self.run_dir, f"{self.name} to the launcher")

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    @property
    def exit_code(self) -> int:
        return EXIT_INTERRUPTED if self.signum == signal.SIGINT else EXIT_TERMINATED

    def expired(self) -> bool:
        """The grace ran out before the workers stopped."""
        return bool(self.at) and time.monotonic() - self.at > self.grace_s

    def seconds(self) -> float:
        return time.monotonic() - self.at if self.at else 0.0

    def finish(self, tracked: TrackedRun, res: dict[str, Any]) -> int:
        """The signal ended the job (``res``: rank 0's result, {} when none came): the
        run KILLED with its ``stop_reason``, one line naming the checkpoint to resume (the
        stop's, else the newest complete one); the exit code."""
        from turnout.trainer.resume.recovery import newest_checkpoint

        step = int(res.get("stopped_at") or 0)
        checkpoint = str(res.get("checkpoint") or "")
        reason = f"{self.name} to the launcher"
        if not checkpoint:
            reason += f": no checkpoint within launch.preempt_grace_s={self.grace_s:g} s"
            newest = newest_checkpoint(self.run_dir) if self.run_dir else None
            step = int(newest.name.removeprefix("step")) if newest is not None else 0
        tracked.end("KILLED", {STOP_REASON_TAG: reason, "stopped_at": str(step)})
        print(self.line(step, checkpoint, tracked.run_id), file=sys.stderr, flush=True)
        return int(self.exit_code)

    def line(self, stopped_at: int, checkpoint: str, run_id: str) -> str:
        """The one line the launcher prints when the job stopped for this signal."""
        what = "interrupted" if self.signum == signal.SIGINT else f"terminated ({self.name})"
        run = f"; MLflow run {run_id} marked KILLED" if run_id else ""
        resume = resume_command(sys.argv[1:])
        if checkpoint:
            where = (
                f"every worker stopped after step {stopped_at} and saved {checkpoint} "
                f"in {self.seconds():.1f} s{run}; resume: {resume}"
            )
        else:
            where = f"no checkpoint written within {self.grace_s:g} s{run}"
            where += f"; resume: {resume}" if stopped_at else ""
        return f"turnout: {what}: {where}"
