"""Run a validated config on Ray: an embedded local cluster, or one joined by address.

The driver (``turnout train``) has already validated the config and prepared the token
cache; here we start or join Ray, run ``cfg.launch.num_workers`` workers with Ray
Train's ``TorchTrainer`` (gloo on CPU, NCCL on GPU) and hand back rank 0's TrainResult.

Ray is chatty. The user should see the trainer's own progress and the summary, so the
driver replaces Ray's log printer with one that forwards only the training workers'
output, without Ray's ``(RayTrainWorker pid=...)`` prefixes; Ray Train's own logs go
to WARNING. ``TURNOUT_RAY_VERBOSE=1`` restores Ray's normal output.

Ctrl-C: Ray Train's ``fit()`` installs its own SIGINT handler when it runs on the main
thread (it aborts the run and leaves with exit 0 or 1 and no word of ours). So
``fit()`` runs on a helper thread, Ctrl-C stays a KeyboardInterrupt in the main
thread, and :func:`run_ray` answers it by shutting Ray down (every worker of the job
goes with it) before the interrupt reaches the command line.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, cast

from turnout.config import TurnoutConfig
from turnout.errors import WorkerError, one_line
from turnout.launch.cluster import check_reachable, cluster_address, join_cluster
from turnout.launch.restarts import (
    CollectiveWorkerError,
    FinalWorkerError,
    stop_on_final_callback,
    worker_failure,
)
from turnout.launch.worker import run_worker
from turnout.trainer.recovery import run_folder

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


def _verbose() -> bool:
    return os.environ.get("TURNOUT_RAY_VERBOSE", "") not in ("", "0")


class _WorkerLogPrinter:
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


_printer = _WorkerLogPrinter()


def _quiet_ray_output() -> None:
    """Swap Ray's driver-side log printer for :class:`_WorkerLogPrinter`."""
    if _verbose():
        return
    try:
        from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # a Ray without this hook: keep its default printer
        return
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("turnout_worker_logs", _printer)


def _set_ray_env() -> None:
    """Environment the driver must set before Ray Train reads it (user settings win)."""
    # Keep the workers in the driver's working directory (not a Ray trial dir).
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    # Plain print() in workers, not rerouted through Ray Train's logger.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")


def _ray_train_fn(config: dict[str, Any]) -> dict[str, Any]:
    """Runs on every Ray Train worker; rank 0's return value reaches the driver."""
    import ray.train

    cwd = config["cwd"]
    if os.path.isdir(cwd):
        os.chdir(cwd)
    cfg: TurnoutConfig = config["cfg"]
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    try:
        res = run_worker(cfg, config["data_path"], config["run_id"], config["run_dir"])
    except Exception as e:
        # Ray hands this exception object (pickled) to the driver, in
        # TrainingFailedError.worker_failures[rank]: no text to parse there. A final one
        # also stops Ray's restarts (turnout.launch.restarts).
        raise worker_failure(e, rank, Path(config["log_dir"])) from None
    ray.train.report({k: v for k, v in res.items() if isinstance(v, int | float)})
    return res


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
    failed because it went away. A final failure (turnout.launch.restarts) arrives as
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


def _gave_up(error: WorkerError, max_failures: int) -> WorkerError:
    """``error`` saying that restarts did not help (or were off), unless it is final."""
    if isinstance(error, FinalWorkerError):
        return error
    if max_failures == 0:
        why = "no restart: launch.max_failures=0"
    else:
        why = f"after {max_failures} restart(s), launch.max_failures={max_failures}"
    return WorkerError(error.kind, f"{error.message} ({why})", error.rank, error.key, error.log)


def _fit_off_main_thread(trainer: Any) -> Any:
    """``trainer.fit()`` on a helper thread (see the module doc); its result or error."""
    box: dict[str, Any] = {}

    def _fit() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # handed to the main thread, never printed here
            box["error"] = e

    thread = threading.Thread(target=_fit, name="turnout-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.25)
    if "error" in box:
        raise box["error"]
    return box["result"]


def _init_ray(cfg: TurnoutConfig) -> bool:
    """Start an embedded cluster or join one; True when we started it (and must stop it)."""
    import ray

    address = cluster_address(cfg)
    quiet: dict[str, Any] = dict(
        logging_level=logging.WARNING if _verbose() else logging.ERROR,
        log_to_driver=True,
        configure_logging=True,
    )
    if address:
        check_reachable(address)
        join_cluster(address, quiet, verbose=_verbose())
        embedded = False
    else:
        ray.init(
            num_cpus=cfg.launch.num_workers * cfg.launch.cpus_per_worker,
            num_gpus=cfg.launch.num_workers if cfg.launch.use_gpu else 0,
            include_dashboard=False,
            **quiet,
        )
        embedded = True
    _quiet_ray_output()
    return embedded


def run_ray(cfg: TurnoutConfig, data_path: Path, run_id: str = "") -> dict[str, Any]:
    """Train ``cfg`` (paths already absolute) on Ray; returns rank 0's TrainResult dict.

    ``run_id``: the MLflow run the launcher opened for the job ('' = rank 0 opens one).

    Raises :class:`WorkerError` (see :func:`find_worker_error`) when training fails.
    """
    _set_ray_env()
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from turnout.launch.ray_backend import RendezvousConfig

    logging_config: Any = None
    try:
        from ray.train.v2.api.config import LoggingConfig

        logging_config = LoggingConfig
    except ImportError:  # Ray Train v1
        pass

    storage = Path(cfg.launch.storage_path)
    name = f"{cfg.tracking.run_name or 'turnout'}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    log_dir = storage / name / "logs"
    run_kw: dict[str, Any] = dict(
        storage_path=str(storage),
        name=name,
        # A dead worker restarts the group; the attempt resumes from run_dir's newest
        # checkpoint. Failures a restart would repeat stop the run (launch/restarts.py).
        failure_config=FailureConfig(max_failures=cfg.launch.max_failures),
    )
    if logging_config is not None and not _verbose():
        run_kw["logging_config"] = logging_config(log_level="WARNING")
    stop_on_final = stop_on_final_callback()
    if stop_on_final is not None:
        run_kw["callbacks"] = [stop_on_final]
    # Every attempt of the job checkpoints into (and resumes from) this one folder.
    run_dir = run_folder(cfg, run_id)

    interrupted = False
    embedded = _init_ray(cfg)
    try:
        trainer = TorchTrainer(
            # Ray types the loop as returning None; v2 hands rank 0's return value back.
            cast(Any, _ray_train_fn),
            train_loop_config={
                "cfg": cfg,
                "data_path": str(data_path),
                "run_id": run_id,
                "cwd": os.getcwd(),
                "log_dir": str(log_dir),
                "run_dir": str(run_dir),
            },
            scaling_config=ScalingConfig(
                num_workers=cfg.launch.num_workers,
                use_gpu=cfg.launch.use_gpu,
                resources_per_worker={"CPU": cfg.launch.cpus_per_worker},
                placement_strategy=cfg.launch.placement,
            ),
            run_config=RunConfig(**run_kw),
            # Ray sets the rendezvous environment; run_worker creates the group.
            torch_config=RendezvousConfig(),
        )
        try:
            result = _fit_off_main_thread(trainer)
        except KeyboardInterrupt:
            interrupted = True
            raise
        except Exception as e:
            raise _gave_up(find_worker_error(e, log_dir), cfg.launch.max_failures) from None
        res = getattr(result, "return_value", None)
        if not res:
            res = dict(result.metrics or {})
        return res
    finally:
        if interrupted:  # a second Ctrl-C must not cut the clean-up short
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        _printer.close()
        if embedded or interrupted:  # leaving a joined cluster ends this job's actors
            ray.shutdown()
