"""The worker entry every training process runs, with Ray or without it.

Under Ray, :mod:`turnout.launch.ray.run` calls :func:`run_worker` inside each Ray
Train worker. Without Ray (SLURM, the GPU test machine) the same entry runs under
torchrun::

    torchrun --nproc_per_node 2 -m turnout.launch.worker tiny train.steps=50

There every rank validates the config (cheap), rank 0 prepares the token cache while
the others wait at a barrier, and rank 0 prints the summary. SIGTERM to the ranks
(torchrun forwards its own) stops every rank after the same step with a checkpoint;
rank 0 prints one line naming it and every rank exits 143. Config errors give one
``turnout: error: <key>: <message>`` line (from rank 0) and exit code 2; a training
failure gives one line naming the rank and the reason, exit code 1, and the full
traceback in a log file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

from turnout.config import TurnoutConfig
from turnout.config.load import load_config, split_source
from turnout.errors import (
    EXIT_CONFIG,
    EXIT_OK,
    EXIT_TERMINATED,
    ConfigError,
    WorkerError,
    error_line,
)
from turnout.files import write_atomic
from turnout.launch.preflight import preflight
from turnout.launch.summary import format_summary
from turnout.redact import redact


def result_to_dict(result: Any) -> dict[str, Any]:
    """A TrainResult (dataclass or plain object) as a picklable dict of plain values."""
    if result is None:
        return {}
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        raw = dataclasses.asdict(result)
    elif isinstance(result, dict):
        raw = dict(result)
    else:
        raw = dict(vars(result))
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in raw.items()}


def quiet_worker(cfg: TurnoutConfig) -> None:
    """Silence start-up chatter the user cannot act on (call before DeepSpeed loads).

    DeepSpeed warns on every CPU run that it 'was unable to detect' an accelerator:
    tell it. ZeRO calls torch.distributed APIs that torch marks deprecated.
    """
    if not cfg.launch.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings(
        "ignore", message=r".*torch\.distributed\..* is deprecated", category=FutureWarning
    )


def init_process_group(cfg: TurnoutConfig) -> tuple[int, int]:
    """Create this process's default process group (the only call); return (rank, world)."""
    from turnout.parallel.dist import init_distributed, resolve_backend

    backend = resolve_backend(cfg.parallel.backend, cfg.launch.use_gpu)
    return init_distributed(backend, cfg.parallel.timeout_s)


def train_on_group(
    cfg: TurnoutConfig, data_path: Path, attach_to: str = "", run_dir: Path | None = None
) -> dict[str, Any]:
    """Build the parallel groups once and train; returns the TrainResult as a dict.

    ``attach_to``: the MLflow run the launcher opened (and ends); '' = rank 0 opens it.
    ``run_dir``: the job's checkpoint run folder when the launcher may restart the job."""
    from turnout.parallel.groups import build_groups
    from turnout.trainer.train import train

    groups = build_groups(cfg.parallel.ep_size)
    return result_to_dict(train(cfg, data_path, groups, attach_to=attach_to, run_dir=run_dir))


def run_worker(
    cfg: TurnoutConfig, data_path: Path | str, run_id: str = "", run_dir: str = ""
) -> dict[str, Any]:
    """Ray Train worker: process group (from the rendezvous environment Ray set), parallel
    groups, train; returns the TrainResult as a dict. ``run_id``: the MLflow run the
    launcher opened (rank 0 logs to it; the launcher ends it). ``run_dir``: the job's
    checkpoint run folder, the same for every attempt ('' = a fresh one, no recovery)."""
    from turnout.parallel.dist import leave_process_group

    quiet_worker(cfg)
    init_process_group(cfg)
    finished = False
    try:
        folder = Path(run_dir) if run_dir else None
        result = train_on_group(cfg, Path(data_path), attach_to=run_id, run_dir=folder)
        finished = True
        return result
    finally:
        leave_process_group(finished)


def write_traceback(log_dir: Path, rank: int, exc: BaseException) -> Path | None:
    """Write the full traceback of ``exc`` (secrets left out) to ``log_dir/rank<r>.log``;
    return the path."""
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        path = log_dir / f"rank{rank}.log"
        path.write_text(redact("".join(traceback.format_exception(exc))))
        return path
    except OSError:
        return None


def worker_error(exc: BaseException, rank: int, log_dir: Path) -> WorkerError:
    """``exc`` raised on this rank as a :class:`WorkerError`, its traceback in ``log_dir``."""
    log = write_traceback(log_dir, rank, exc)
    return WorkerError.from_exception(exc, rank, str(log) if log else "")


#: The MLflow run ``turnout train --launcher torchrun`` opened for the job ('' = rank 0
#: opens and ends one itself, as under a bare ``torchrun``).
ATTACH_ENV = "TURNOUT_MLFLOW_RUN_ID"
#: Where rank 0 writes the run's result as JSON when it finishes ('' = nowhere): how
#: ``turnout sweep`` reads a trial's losses and times without parsing the summary.
RESULT_ENV = "TURNOUT_RESULT_FILE"
#: The job's checkpoint run folder, fixed by ``turnout train --launcher torchrun`` (unset
#: under a bare torchrun: rank 0 names one). The launcher's stop request lands there.
RUN_DIR_ENV = "TURNOUT_RUN_DIR"


def write_result(path: str, res: dict[str, Any]) -> None:
    """``res`` as JSON at ``path`` (no-op for ''), atomically: a reader sees all or none."""
    if not path:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, json.dumps(res, indent=1, sort_keys=True, default=str))


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def _prepare_on_rank0(cfg: TurnoutConfig, rank: int) -> Path:
    """Rank 0 prepares the token cache; everyone gets its path (or the ConfigError)."""
    import torch.distributed as dist

    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = ("ok", str(preflight(cfg)))
        except ConfigError as e:
            box[0] = ("config", (e.key, e.message))
    dist.broadcast_object_list(box, src=0)
    kind, payload = box[0]
    if kind == "config":
        raise ConfigError(*payload)
    return Path(payload)


def main(argv: list[str] | None = None) -> int:
    """torchrun entry: ``python -m turnout.launch.worker [PRESET|file.yaml] [k=v ...]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    rank = _env_int("RANK", 0)
    world = _env_int("WORLD_SIZE", 1)
    source, overrides = split_source(args)
    # The real world size is torchrun's; validate against it (ep divisibility etc.).
    overrides = [*overrides, f"launch.num_workers={world}"]
    try:
        cfg = load_config(source, overrides)
    except ConfigError as e:
        if rank == 0:
            print(error_line(str(e)), file=sys.stderr)
        return EXIT_CONFIG

    from turnout.config.train import RESUME_AUTO
    from turnout.trainer.stop import PreemptedError, install_handlers

    install_handlers()  # SIGTERM: stop after a step, with a checkpoint
    if cfg.train.resume == RESUME_AUTO:  # every rank finds the same checkpoint
        from turnout.launch.paths import resolve_paths
        from turnout.trainer.resume.auto import resolve_auto

        cfg = resolve_auto(resolve_paths(cfg))
    quiet_worker(cfg)
    try:
        rank, world = init_process_group(cfg)
        data_path = _prepare_on_rank0(cfg, rank)
    except ConfigError as e:
        if rank == 0:
            print(error_line(str(e)), file=sys.stderr)
        return EXIT_CONFIG

    try:
        run_dir = Path(os.environ[RUN_DIR_ENV]) if os.environ.get(RUN_DIR_ENV) else None
        res = train_on_group(
            cfg, data_path, attach_to=os.environ.get(ATTACH_ENV, ""), run_dir=run_dir
        )
    except PreemptedError as e:  # no launcher here restarts it: leave as SIGTERM asks
        if rank == 0:
            print(f"turnout: terminated: {e}", file=sys.stderr, flush=True)
        return EXIT_TERMINATED
    except Exception as e:  # one line to the user, the full traceback to a file
        err = worker_error(e, rank, Path(".turnout", "logs").resolve())
        if err.kind != "config" or rank == 0:  # every rank finds a config error alike
            print(error_line(err.text()), file=sys.stderr)
        return err.exit_code
    from turnout.parallel.dist import leave_process_group

    if res.get("stopped_at"):  # a stop request: every rank stopped after this step, saved
        if rank == 0:
            write_result(os.environ.get(RESULT_ENV, ""), res)
            if run_dir is None:  # no turnout launcher to say it (a stop file by hand)
                print(
                    f"turnout: terminated ({res['stop_reason']}): every rank stopped after "
                    f"step {res['stopped_at']} and saved {res['checkpoint']}; resume with "
                    f"train.resume={res['checkpoint']}",
                    file=sys.stderr,
                    flush=True,
                )
        leave_process_group(finished=True)
        # Our launcher asked and says so: a clean stop (torchrun reports no failure).
        return EXIT_OK if run_dir is not None else EXIT_TERMINATED
    if rank == 0:
        print(format_summary(cfg, res), flush=True)
        write_result(os.environ.get(RESULT_ENV, ""), res)
    leave_process_group(finished=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
