"""The worker entry every training process runs, with Ray or without it.

Under Ray, :mod:`turnout.launch.ray_launch` calls :func:`run_worker` inside each Ray
Train worker. Without Ray (SLURM, the GPU test machine) the same entry runs under
torchrun::

    torchrun --nproc_per_node 2 -m turnout.launch.worker tiny train.steps=50

There every rank validates the config (cheap), rank 0 prepares the token cache while
the others wait at a barrier, and rank 0 prints the summary. Config errors give one
``turnout: error: <key>: <message>`` line (from rank 0) and exit code 2; a training
failure gives one line naming the rank and the reason, exit code 1, and the full
traceback in a log file.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

from turnout.config import TurnoutConfig
from turnout.config.load import load_config, split_source
from turnout.errors import EXIT_CONFIG, EXIT_OK, ConfigError, WorkerError, error_line


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
    from turnout.trainer.loop import train

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
    """Write the full traceback of ``exc`` to ``log_dir/rank<r>.log``; return the path."""
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        path = log_dir / f"rank{rank}.log"
        path.write_text("".join(traceback.format_exception(exc)))
        return path
    except OSError:
        return None


def worker_error(exc: BaseException, rank: int, log_dir: Path) -> WorkerError:
    """``exc`` raised on this rank as a :class:`WorkerError`, its traceback in ``log_dir``."""
    log = write_traceback(log_dir, rank, exc)
    return WorkerError.from_exception(exc, rank, str(log) if log else "")


def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None:
        return "n/a"
    try:
        f = float(value)
    except (TypeError, ValueError):
        return str(value)
    return format(f, spec) if math.isfinite(f) else str(f)


def ui_hint(uri: str) -> str:
    """How to look at the MLflow store ``uri``."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}"


def _number(value: Any) -> float | None:
    """``value`` as a finite float, else None (absent, NaN, not a number)."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def compute_lines(cfg: TurnoutConfig, res: dict[str, Any]) -> list[str]:
    """The summary's compute lines: FLOPs per token against the equal-shape dense model,
    total training FLOPs, achieved TFLOP/s and MFU, peak memory per rank (each line only
    when the result carries it)."""
    lines = []
    fpt, dense = _number(res.get("flops_per_token")), _number(res.get("dense_flops_per_token"))
    if fpt is not None and dense is not None and dense > 0:
        lines.append(
            f"  FLOPs per token        {fpt / 1e6:.2f} M train (3x forward), "
            f"{fpt / dense:.2f} of the equal-shape dense model's {dense / 1e6:.2f} M"
        )
    total = _number(res.get("train_flops"))
    if total is not None:
        lines.append(f"  training FLOPs         {total:.3e}")
    tflops, peak, util = (_number(res.get(k)) for k in ("tflops", "peak_tflops", "mfu"))
    if tflops is not None:
        world = cfg.launch.num_workers
        how = "measured" if res.get("peak_measured") else "train.peak_tflops"
        mfu = (
            f", MFU {100.0 * util:.1f}% of {world} x {peak:.3g} TFLOP/s ({how})"
            if util is not None and peak is not None
            else ""
        )
        lines.append(f"  achieved               {tflops:.3g} TFLOP/s{mfu}")
    memory = res.get("peak_memory_mb") or []
    if memory:
        per_rank = ", ".join(f"{m:,.0f}" for m in memory)
        kind = res.get("memory_kind") or "peak"
        lines.append(f"  peak memory per rank   {per_rank} MiB ({kind})")
    return lines


def format_summary(cfg: TurnoutConfig, res: dict[str, Any]) -> str:
    """The end-of-run summary the user reads (printed by the launcher or torchrun rank 0)."""
    val, ent = res.get("final_val_loss"), res.get("unigram_entropy")
    causal, bpb = res.get("final_val_loss_causal"), res.get("final_val_bpb")
    depth = res.get("final_depth_mean")
    rel = ""
    if val is not None and ent:
        rel = f"  ({100.0 * float(val) / float(ent):.0f}% of the unigram entropy)"
    unit = "byte" if cfg.data.tokenizer == "byte" else "token"
    lines = [
        "",
        "turnout: training finished",
        f"  steps                  {res.get('steps', 'n/a')}",
        f"  final train loss       {_fmt(res.get('final_train_loss'))} nats/{unit}",
        f"  final val loss         {_fmt(val)} nats/{unit}{rel}",
        *(
            [f"  val bits per byte      {_fmt(bpb)}  (comparable across tokenizers)"]
            if bpb is not None and math.isfinite(float(bpb))
            else []
        ),
        *(
            [f"  val loss, causal MoD   {_fmt(causal)} nats/{unit}  (predictor decisions)"]
            if causal is not None and math.isfinite(float(causal))
            else []
        ),
        *(
            [f"  average depth used     {_fmt(depth, '.2f')} blocks per token  (exit / halt rule)"]
            if depth is not None and math.isfinite(float(depth))
            else []
        ),
        f"  corpus unigram entropy {_fmt(ent)} nats/{unit}",
        f"  throughput             {_fmt(res.get('tokens_per_s'), ',.0f')} tokens/s",
        *compute_lines(cfg, res),
        f"  wall time              {_fmt(res.get('wall_s'), '.1f')} s",
    ]
    if res.get("restarts"):
        lines.append(f"  restarts               {res['restarts']} (after worker failures)")
        lines.append(
            f"  steps redone           {res.get('steps_redone', 0)} "
            "(trained after the checkpoint a restart resumed from)"
        )
    if res.get("skipped_steps"):
        lines.append(f"  skipped steps          {res['skipped_steps']} (non-finite gradients)")
    if res.get("checkpoint"):
        lines.append(f"  checkpoint             {res['checkpoint']}")
    if cfg.tracking.enabled:
        lines.append(f"  MLflow run id          {res.get('run_id') or 'n/a'}")
        lines.append(f"  MLflow UI              {ui_hint(cfg.tracking.uri)}")
    else:
        lines.append("  MLflow                 disabled (tracking.enabled=false)")
    return "\n".join(lines)


#: The MLflow run ``turnout train --launcher torchrun`` opened for the job ('' = rank 0
#: opens and ends one itself, as under a bare ``torchrun``).
ATTACH_ENV = "TURNOUT_MLFLOW_RUN_ID"


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def preflight(cfg: TurnoutConfig) -> Path:
    """The checks that read the disk, made once before any worker trains.

    The tracking store's kind, the ``train.resume`` checkpoint (else the
    ``train.init_from`` source's config against this model), then the corpus
    (:func:`prepare_data`). Raises ConfigError naming tracking.uri, train.resume,
    train.init_from / the model key it cannot map, or data.*; returns the token cache.
    """
    from turnout.trainer.tracking_uri import check_tracking_uri

    if cfg.tracking.enabled:
        check_tracking_uri(cfg.tracking.uri)
    if cfg.train.resume:
        from turnout.trainer.resume_layout import resume_config, verify_checkpoint

        verify_checkpoint(cfg.train.resume)  # every file as written (the manifest)
        resume_config(cfg)  # and it fits this layout
    elif cfg.train.init_from:
        from turnout.trainer.upcycle import check_init_from

        check_init_from(cfg)
    return prepare_data(cfg)


def prepare_data(cfg: TurnoutConfig) -> Path:
    """Tokenize the corpus once, on the launcher, and check the splits fit the run.

    Raises ConfigError('data.*' / 'model.vocab_size') before any worker starts.
    """
    from turnout.config.train import validate_vocab
    from turnout.trainer.data import BatchSampler, open_tokens
    from turnout.trainer.tokenize_stream import prepare_corpus

    # Not in the config's own validation: a config that only builds a model (plan, tests,
    # upcycling sources) may have any vocabulary; training on a corpus may not.
    validate_vocab(cfg.data, cfg.model.vocab_size)

    path = Path(prepare_corpus(cfg.data, cfg.model.vocab_size))
    # The samplers' own size checks, for every rank's shard (cheap: a memmap).
    data = open_tokens(path, cfg.data.val_fraction)
    BatchSampler(
        data,
        cfg.model.max_seq_len,
        cfg.train.micro_batch_size,
        rank=0,
        world=cfg.launch.num_workers,
        seed=cfg.train.seed,
        eval_batches=cfg.train.eval_batches,
    )
    return path


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

    quiet_worker(cfg)
    try:
        rank, world = init_process_group(cfg)
        data_path = _prepare_on_rank0(cfg, rank)
    except ConfigError as e:
        if rank == 0:
            print(error_line(str(e)), file=sys.stderr)
        return EXIT_CONFIG

    try:
        res = train_on_group(cfg, data_path, attach_to=os.environ.get(ATTACH_ENV, ""))
    except Exception as e:  # one line to the user, the full traceback to a file
        err = worker_error(e, rank, Path(".turnout", "logs").resolve())
        if err.kind != "config" or rank == 0:  # every rank finds a config error alike
            print(error_line(err.text()), file=sys.stderr)
        return err.exit_code
    if rank == 0:
        print(format_summary(cfg, res), flush=True)
    from turnout.parallel.dist import leave_process_group

    leave_process_group(finished=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
