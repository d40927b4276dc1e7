"""Run a validated config on Ray: an embedded local cluster, or one joined by address.

The driver (``turnout train``) has already validated the config and prepared the token
cache; here we start or join Ray, run ``cfg.launch.num_workers`` workers with Ray
Train's ``TorchTrainer`` (gloo on CPU, NCCL on GPU) and hand back rank 0's TrainResult.

An embedded cluster listens on loopback only and runs with token authentication, a
token made for the run; joining one needs token authentication configured
(:mod:`turnout.launch.ray.auth`).

Ray is chatty. The user should see the trainer's own progress and the summary, so the
driver keeps only the training workers' output (:mod:`turnout.launch.ray.logs`); Ray
Train's own logs go to WARNING. A failed job becomes one line
(:mod:`turnout.launch.ray.failures`).

Ray Train's ``fit()`` installs its own SIGINT handler when it runs on the main thread
(it aborts the run and leaves with exit 0 or 1 and no word of ours). So ``fit()`` runs
on a helper thread, signals stay the main thread's, and a second signal (or a grace
that ran out) becomes a KeyboardInterrupt there, which :func:`run_ray` answers by
shutting Ray down (every worker of the job goes with it) before it reaches the command
line. A stopped job shuts Ray down too (a joined cluster: this job's actors).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, cast

from turnout.config import TurnoutConfig
from turnout.launch.preempt import DriverStop
from turnout.launch.ray.auth import (
    isolate_local_cluster,
    leave_local_cluster,
    local_init_kw,
    require_token_auth,
)
from turnout.launch.ray.cluster import KEY, check_reachable, cluster_address, join_cluster
from turnout.launch.ray.failures import find_worker_error, gave_up
from turnout.launch.ray.logs import printer, quiet_ray_output, verbose
from turnout.launch.ray.restarts import (
    stop_on_final_callback,
    worker_failure,
)
from turnout.launch.worker import run_worker
from turnout.trainer.resume.recovery import run_folder


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
        # also stops Ray's restarts (turnout.launch.ray.restarts).
        raise worker_failure(e, rank, Path(config["log_dir"])) from None
    ray.train.report({k: v for k, v in res.items() if isinstance(v, int | float)})
    return res


def _fit_off_main_thread(trainer: Any, stop: DriverStop | None = None) -> Any:
    """``trainer.fit()`` on a helper thread (see the module doc); its result or error.
    KeyboardInterrupt when ``stop``'s grace runs out before the workers stopped."""
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
        if stop is not None and stop.expired():
            raise KeyboardInterrupt
    if "error" in box:
        raise box["error"]
    return box["result"]


def _init_ray(cfg: TurnoutConfig) -> bool:
    """Start an embedded cluster or join one; True when we started it (and must stop it)."""
    import ray

    address = cluster_address(cfg)
    quiet: dict[str, Any] = dict(
        logging_level=logging.WARNING if verbose() else logging.ERROR,
        log_to_driver=True,
        configure_logging=True,
    )
    if address:
        require_token_auth(address, cfg.launch.allow_unauthenticated, KEY)
        check_reachable(address)
        join_cluster(address, quiet, verbose=verbose())
        embedded = False
    else:
        isolate_local_cluster()  # loopback only, a token of this run's own
        ray.init(
            num_cpus=cfg.launch.num_workers * cfg.launch.cpus_per_worker,
            num_gpus=cfg.launch.num_workers if cfg.launch.use_gpu else 0,
            include_dashboard=False,
            **local_init_kw(),
            **quiet,
        )
        embedded = True
    quiet_ray_output()
    return embedded


def run_ray(
    cfg: TurnoutConfig, data_path: Path, run_id: str = "", stop: DriverStop | None = None
) -> dict[str, Any]:
    """Train ``cfg`` (paths already absolute) on Ray; returns rank 0's TrainResult dict.

    ``run_id``: the MLflow run the launcher opened for the job ('' = rank 0 opens one).
    ``stop``: the launcher's signal handling, armed once Ray is up (its ``run_dir`` set).

    Raises :class:`WorkerError` (see :func:`find_worker_error`) when training fails.
    """
    _set_ray_env()
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from turnout.launch.ray.backend import RendezvousConfig

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
        # checkpoint. Failures a restart would repeat stop the run (launch/ray/restarts.py).
        failure_config=FailureConfig(max_failures=cfg.launch.max_failures),
    )
    if logging_config is not None and not verbose():
        run_kw["logging_config"] = logging_config(log_level="WARNING")
    stop_on_final = stop_on_final_callback()
    if stop_on_final is not None:
        run_kw["callbacks"] = [stop_on_final]
    # Every attempt of the job checkpoints into (and resumes from) this one folder.
    run_dir = run_folder(cfg, run_id)

    interrupted = False
    embedded = _init_ray(cfg)
    if stop is not None:  # after ray.init: ours replace the handlers Ray installed
        stop.arm(run_dir)
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
            result = _fit_off_main_thread(trainer, stop)
        except KeyboardInterrupt:
            interrupted = True
            raise
        except Exception as e:
            raise gave_up(find_worker_error(e, log_dir), cfg.launch.max_failures) from None
        res = getattr(result, "return_value", None)
        if not res:
            res = dict(result.metrics or {})
        return res
    finally:
        if interrupted:  # a second Ctrl-C must not cut the clean-up short
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        printer.close()
        stopped = stop is not None and stop.signum
        if embedded or interrupted or stopped:  # leaving a joined cluster ends our actors
            ray.shutdown()
        if embedded:
            leave_local_cluster()
