"""The training loop; runs on every rank inside one process group.

``train(cfg, data_path, groups)`` runs inside the process group the worker entry
created (``turnout.parallel.dist.init_distributed``), with the parallel groups it built
once (``turnout.parallel.groups.build_groups``). It reads top-down:

- :func:`turnout.trainer.run_setup.setup` seeds, opens the data, builds the model
  (from ``train.init_from`` when set) with expert parallelism, the DeepSpeed engine and
  the MLflow run, counts the training FLOPs per token and measures the device's peak;
- every optimizer step is :func:`turnout.trainer.step.run_step` (which stops every
  rank together on a non-finite loss); steps DeepSpeed skipped are counted and, past
  ``train.max_consecutive_skipped_steps`` in a row, stop every rank
  (:mod:`turnout.trainer.skips`);
- :func:`turnout.trainer.meter.due` decides when to log (every ``log_every`` steps, MLflow
  on rank 0, a tqdm bar on rank 0), validate (every ``eval_every`` steps, loss averaged
  over all ranks) and checkpoint (every ``ckpt_every`` steps); all three also run after
  the last step. Training resumes from ``train.resume``, or, in an attempt Ray
  restarted after a worker died, from the job's newest checkpoint
  (:mod:`turnout.trainer.resume.recovery`). Tracking never blocks a step
  (:mod:`turnout.trainer.tracking.tracker`); the run ends FINISHED, FAILED or KILLED;
- a stop request (SIGTERM to the launcher or to a worker, :mod:`turnout.trainer.stop`)
  rides on the step's finite-loss all-reduce, so every rank stops after the same step;
  the loop logs that step, checkpoints it and returns (``stopped_at``), or, when only
  worker processes were signalled, raises :class:`~turnout.trainer.stop.PreemptedError`
  for the launcher to restart from that checkpoint with no step redone;
- the result carries the whole run's FLOP accounting (FLOPs per token and as a fraction
  of the equal-shape dense model, total training FLOPs, achieved TFLOP/s, MFU) and each
  rank's peak memory, also logged to MLflow;
- rank 0 then logs the final checkpoint as the run's MLflow model
  (``tracking.log_model``, :mod:`turnout.trainer.tracking.model_log`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from turnout.config import TurnoutConfig
from turnout.parallel.dist import all_reduce_sum, device
from turnout.parallel.groups import ParallelGroups
from turnout.trainer.balance import BiasBalancer
from turnout.trainer.checkpointing import collective as checkpoint
from turnout.trainer.checkpointing import retention
from turnout.trainer.data.batches import (
    bits_per_byte,
)
from turnout.trainer.eval.depth import depth_eval
from turnout.trainer.eval.validation import evaluate
from turnout.trainer.meter import Interval, IntervalMeter, RunMeter, due, mfu, model_tflops
from turnout.trainer.metrics.compute import (
    memory_kind,
    peak_memory_mb,
)
from turnout.trainer.metrics.load_view import LoadMonitor
from turnout.trainer.metrics.routing import StatsAccumulator
from turnout.trainer.resume.layout import resume_config
from turnout.trainer.resume.recovery import Attempt, begin_attempt, log_restart
from turnout.trainer.run_setup import Run, progress_bar, setup
from turnout.trainer.skips import SkipCounter
from turnout.trainer.step import NonFiniteLossError, run_step
from turnout.trainer.stop import PreemptedError, StopVote, signalled, stop_requested
from turnout.trainer.structure.sampler import StructureSampler
from turnout.trainer.structure.validation import name_pass
from turnout.trainer.tracking.model_log import log_run_model
from turnout.trainer.tracking.store import record_run_id

__all__ = ["NonFiniteLossError", "TrainResult", "train"]

log = logging.getLogger("turnout.trainer")


@dataclass
class TrainResult:
    final_train_loss: float
    """Mean cross-entropy (nats/token) over the last log interval, all ranks."""
    final_val_loss: float
    """Validation cross-entropy at the end (MoD top-k routing), averaged over ranks."""
    unigram_entropy: float
    """Byte-unigram entropy of the training split (nats/token): the baseline to beat."""
    steps: int
    """Optimizer steps completed (including those before a resume)."""
    tokens_per_s: float
    """Training tokens per second over all ranks: train steps only, the first step of the
    run (lazy imports, allocator warm-up) left out when more than one step ran."""
    wall_s: float
    """Seconds spent in train() on this rank."""
    run_id: str
    """MLflow run id (rank 0 with tracking enabled; '' otherwise)."""
    checkpoint: str
    """Folder of the final checkpoint."""
    final_val_bpb: float = float("nan")
    """final_val_loss in bits per UTF-8 byte of the validation split (comparable across
    tokenizers): loss x val tokens / val bytes / ln 2."""
    final_val_loss_causal: float = float("nan")
    """Validation loss with causal MoD decisions (the predictor), as when sampling."""
    final_depth_mean: float = float("nan")
    """Early-exit / ponder models: blocks per validation token under the decode rule."""
    flops_per_token: float = float("nan")
    """Training FLOPs per token (3x forward, top-k routing) on the run's micro batches."""
    dense_flops_per_token: float = float("nan")
    """The same for the dense model of equal shape (every block dense)."""
    train_flops: float = float("nan")
    """Training FLOPs of this run's steps, all ranks (flops_per_token x tokens)."""
    tflops: float = float("nan")
    """Achieved model TFLOP/s over all ranks (flops_per_token x tokens_per_s / 1e12)."""
    peak_tflops: float = float("nan")
    """Peak TFLOP/s of one rank: train.peak_tflops, or the probe's (mean over ranks)."""
    peak_measured: bool = False
    """Whether peak_tflops was measured by the probe (train.peak_tflops = 0)."""
    mfu: float = float("nan")
    """Model FLOPs utilisation: tflops / (peak_tflops x ranks)."""
    peak_memory_mb: list[float] = field(default_factory=list)
    """Peak memory of each rank in MiB (CPU max RSS, or CUDA max allocated)."""
    memory_kind: str = ""
    """What peak_memory_mb measures."""
    skipped_steps: int = 0
    """Optimizer steps DeepSpeed skipped (non-finite gradients) in this run."""
    restarts: int = 0
    """Automatic restarts of the job after a worker died
    (:mod:`turnout.trainer.resume.recovery`)."""
    steps_redone: int = 0
    """Steps failed attempts trained after their last checkpoint, trained again."""
    model_uri: str = ""
    """``models:/<id>`` of the MLflow logged model of the final checkpoint
    (``tracking.log_model``; rank 0; '' when not logged)."""
    stopped_at: int = 0
    """The step every rank stopped after on a stop request, checkpointed (0 = ran to
    ``train.steps``)."""
    stop_reason: str = ""
    """Who asked for that stop ('' = no stop)."""
    unit: str = "token"
    """What tokens_per_s and flops_per_token count: 'token', or 'node' for the
    function-name task (data.structure=ast): syntax-tree nodes per second, FLOPs per node."""
    final_val_f1: float = float("nan")
    """Function-name task: subtoken F1 of the held-out names (code2vec's)."""
    final_val_exact: float = float("nan")
    """Function-name task: fraction of held-out names predicted exactly."""


def _log_start(run: Run, step: int) -> None:
    """Log what is fixed for the run: the baseline loss, FLOPs per token (node), the peak."""
    metrics = {
        "name_entropy" if run.structure else "unigram_entropy": run.unigram_entropy,
        f"flops_per_{run.unit}": run.flops.per_token,
        f"dense_flops_per_{run.unit}": run.flops.dense_per_token,
        "flop_fraction": run.flops.fraction_of_dense,
        "peak_tflops": run.peak_tflops,
    }
    if run.peak_measured:
        metrics["peak_tflops_measured"] = run.peak_tflops
    run.tracker.log_metrics(metrics, step=step)


def _peak_memory(run: Run) -> list[float]:
    """Collective: every rank's peak memory in MiB, in rank order."""
    slots = torch.zeros(run.world, dtype=torch.float64)
    slots[run.rank] = peak_memory_mb(device())
    return [float(v) for v in all_reduce_sum(slots, "peak memory")]


def _log_interval(
    run: Run,
    stats: StatsAccumulator,
    interval: Interval,
    lr: float,
    done: int,
    skipped: int,
    loads: LoadMonitor | None = None,
) -> None:
    """Collective (the routing statistics are reduced): log one interval's metrics; the
    summed expert counts also go to ``loads`` (dead-expert warnings, the heatmap)."""
    metrics = stats.reduce()
    if loads is not None:
        loads.observe(stats.last_loads, done)
    metrics["skipped_steps"] = float(skipped)
    memory = _peak_memory(run)
    metrics["peak_memory_mb"] = max(memory)
    metrics.update({f"rank{r}/peak_memory_mb": mb for r, mb in enumerate(memory)})
    tflops = model_tflops(run.flops.per_token, interval.tokens_per_s)
    metrics.update({"loss": interval.loss, "lr": lr, f"{run.unit}s_per_s": interval.tokens_per_s})
    metrics.update(tflops=tflops, mfu=mfu(tflops, run.peak_tflops, run.world))
    norm = run.engine.get_global_grad_norm()
    if norm is not None:
        metrics["grad_norm"] = float(norm)
    run.tracker.log_metrics(metrics, step=done, once=True)


@dataclass(frozen=True)
class Validation:
    loss: float = math.nan
    """Validation cross-entropy with MoD top-k routing, averaged over ranks."""
    loss_causal: float = math.nan
    """The same with causal MoD decisions (the predictor); nan without MoD blocks."""
    depth_mean: float = math.nan
    """Early-exit / ponder models: blocks per token under the decode rule."""
    bpb: float = math.nan
    """``loss`` in bits per byte."""
    f1: float = math.nan
    """Function-name task: subtoken F1."""
    exact: float = math.nan
    """Function-name task: exact-match fraction."""


def _validate(run: Run, done: int, bar: Any) -> Validation:
    """Collective: validation loss(es) after step ``done``, logged."""
    batches = run.cfg.train.eval_batches
    if isinstance(run.sampler, StructureSampler):
        return _validate_names(run, run.sampler, done, bar)
    loss = evaluate(run.engine, run.sampler, batches, "topk")
    val = Validation(loss=loss, bpb=bits_per_byte(loss, run.val_tokens_per_byte))
    metrics = {"val_loss": val.loss, "val_bpb": val.bpb}
    if run.cfg.model.depth_kind() is not None:  # exits / halting: the decode rule's depth
        causal, depth = depth_eval(run.engine, run.sampler, batches, run.cfg.model)
        val = Validation(val.loss, causal, depth["val_depth_mean"], val.bpb)
        metrics.update(depth, val_loss_causal=causal)
    elif run.cfg.model.uses_mod():
        causal = evaluate(run.engine, run.sampler, batches, "causal")
        val = Validation(val.loss, causal, bpb=val.bpb)
        metrics["val_loss_causal"] = val.loss_causal
    run.tracker.log_metrics(metrics, step=done, once=True)
    if bar is not None:
        bar.write(
            f"step {done}: val_loss {val.loss:.4f} (unigram entropy {run.unigram_entropy:.4f})"
        )
    return val


def _validate_names(run: Run, sampler: StructureSampler, done: int, bar: Any) -> Validation:
    """Collective: the function-name task's held-out loss, F1 and exact match, logged."""
    over_ranks = partial(all_reduce_sum, name="validation names")
    res = name_pass(run.engine, sampler, run.cfg.train.eval_batches, run.engine.device, over_ranks)
    val = Validation(loss=res.loss, f1=res.score.f1, exact=res.score.exact)
    metrics = {
        "val_loss": res.loss,
        "val_f1": res.score.f1,
        "val_precision": res.score.precision,
        "val_recall": res.score.recall,
        "val_exact": res.score.exact,
    }
    run.tracker.log_metrics(metrics, step=done, once=True)
    if bar is not None:
        bar.write(
            f"step {done}: val_loss {res.loss:.4f} (name entropy {run.unigram_entropy:.4f}), "
            f"F1 {res.score.f1:.3f}, exact {res.score.exact:.3f}"
        )
    return val


def _checkpoint(run: Run, done: int) -> str:
    """Collective: save the state after step ``done``; return the checkpoint folder."""
    state: dict[str, Any] = {"step": done, "seed": run.cfg.train.seed, "world_size": run.world}
    if isinstance(run.sampler, StructureSampler):  # what each name class means, for eval
        state["name_targets"] = list(run.sampler.data.targets)
    t0 = time.perf_counter()
    folder = checkpoint.save(
        run.engine, run.run_dir, done, state, run.groups, run.cfg, run.tokenizer_file
    )
    log.debug("rank %d: checkpoint %.1fs", run.rank, time.perf_counter() - t0)
    pruned: list[str] = []
    if run.rank == 0:  # the save has finished on every rank: prune, check the space left
        pruned = retention.after_save(run.run_dir, folder, run.cfg.train).removed
    if run.tracker.run_id:  # rank 0: the run a resume from this folder appends to
        record_run_id(run.run_dir, run.tracker.run_id)
    run.tracker.log_checkpoint(str(folder), done, pruned)
    return str(folder)


def train(
    cfg: TurnoutConfig,
    data_path: Path,
    groups: ParallelGroups,
    attach_to: str = "",
    run_dir: Path | None = None,
) -> TrainResult:
    """Train on every rank (collective); see the module docstring.

    ``attach_to``: the id of the MLflow run the launcher opened (and ends); rank 0 only
    logs to it. '' (default): rank 0 opens and ends the run. ``run_dir``: the job's
    checkpoint run folder, fixed by a launcher that may restart the job: an attempt that
    finds a checkpoint of its own there resumes from it (:mod:`turnout.trainer.resume.recovery`).
    None: a fresh folder, no recovery."""
    t_start = time.perf_counter()
    attempt = begin_attempt(run_dir, groups.rank, cfg.train.resume) if run_dir else Attempt()
    if attempt.resume:  # a restart: the newest checkpoint this job saved
        cfg = replace(cfg, train=replace(cfg.train, resume=attempt.resume))
    cfg = resume_config(cfg, groups.world)  # the checkpoint's global batch at this world
    run = setup(cfg, data_path, groups, attach_to, run_dir)
    t = cfg.train
    stats = StatsAccumulator(cfg.tracking.expert_series_max)
    balancer = BiasBalancer(run.engine.module)
    skips = SkipCounter(t.max_consecutive_skipped_steps)
    interval, whole = IntervalMeter(run.tokens_per_step), RunMeter(run.tokens_per_step)
    final_train, val, ckpt = math.nan, Validation(), ""
    bar, status = None, "FAILED"
    stop, last = StopVote(), t.steps

    def ask_stop() -> tuple[bool, bool]:  # rank 0 reads the launcher's request (one stat)
        return run.rank == 0 and bool(stop_requested(run.run_dir)), bool(signalled())

    try:
        start = int(checkpoint.load(run.engine, t.resume, groups).get("step", 0)) if t.resume else 0
        _log_start(run, start)
        log_restart(run.tracker, run.rank, attempt, start)
        loads = LoadMonitor(cfg, run.tracker, run.rank, start)
        bar = progress_bar(run.rank, t.steps, start)
        for step in range(start, t.steps):
            done = step + 1
            lr = float(run.scheduler.get_last_lr()[0])
            res = run_step(
                run.engine,
                run.sampler,
                step,
                t.grad_accum,
                stats,
                run.rank,
                run.world,
                balancer,
                ask_stop,
            )
            units = run.units(step)
            interval.add(res.loss, res.seconds, units)
            whole.add(res.seconds, units)
            skips.add(done, res.skipped)
            attempt.record(done)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{res.loss:.3f}", lr=f"{lr:.2e}")
            if due(done, t.log_every, t.steps):
                summary = interval.flush()
                final_train = summary.loss
                _log_interval(run, stats, summary, lr, done, skips.total, loads)
            if due(done, t.eval_every, t.steps):
                val = _validate(run, done, bar)
            if due(done, t.ckpt_every, t.steps):
                ckpt = _checkpoint(run, done)
            if res.vote.stop and done < t.steps:  # every rank: the same step, the same vote
                stop, last = res.vote, done
                if not due(done, t.log_every, t.steps):
                    summary = interval.flush()
                    final_train = summary.loss
                    _log_interval(run, stats, summary, lr, done, skips.total, loads)
                if not due(done, t.ckpt_every, t.steps):
                    ckpt = _checkpoint(run, done)
                break
        if start >= t.steps:  # resumed at its last step: nothing to train, still measured
            val = _validate(run, t.steps, bar)
        memory = _peak_memory(run)
        end = _end_metrics(run, whole, memory)
        end["skipped_steps"] = float(skips.total)
        run.tracker.log_metrics(end, step=last)
        status = "KILLED" if stop.stop else "FINISHED"
        if stop.stop and run.tracker.owns_run:  # torchrun: rank 0 ends the run itself
            run.tracker.set_tags({"stop_reason": stop.reason(), "stopped_at": str(last)})
        log.debug("rank %d: loop done after %.1fs", run.rank, time.perf_counter() - t_start)
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if bar is not None:
            bar.close()
        run.system.stop()
        run.tracker.finish(status)
    if stop.preempted:  # the launcher goes on: it restarts from this checkpoint
        raise PreemptedError(last, stop.reason(), ckpt)
    model_uri = ""  # after finish: the final metrics are in the store, to link to the model
    if run.structure and run.tracker.run_id and cfg.tracking.log_model:
        log.info("tracking.log_model: a function-name model is not logged as an MLflow model")
    elif run.tracker.run_id and cfg.tracking.log_model and ckpt and not stop.stop:
        model_uri = log_run_model(cfg, run.tracker.run_id, ckpt, t.steps)
    return TrainResult(
        final_train_loss=final_train,
        final_val_loss=val.loss,
        unigram_entropy=run.unigram_entropy,
        steps=last,
        tokens_per_s=whole.tokens_per_s(),
        wall_s=time.perf_counter() - t_start,
        run_id=run.tracker.run_id,
        checkpoint=ckpt,
        final_val_loss_causal=val.loss_causal,
        final_depth_mean=val.depth_mean,
        final_val_bpb=val.bpb,
        flops_per_token=run.flops.per_token,
        dense_flops_per_token=run.flops.dense_per_token,
        train_flops=end["train_flops"],
        tflops=end["run_tflops"],
        peak_tflops=run.peak_tflops,
        peak_measured=run.peak_measured,
        mfu=end["run_mfu"],
        peak_memory_mb=memory,
        memory_kind=memory_kind(device()),
        skipped_steps=skips.total,
        restarts=attempt.number,
        steps_redone=attempt.steps_redone,
        model_uri=model_uri,
        stopped_at=last if stop.stop else 0,
        stop_reason=stop.reason() if stop.stop else "",
        unit=run.unit,
        final_val_f1=val.f1,
        final_val_exact=val.exact,
    )


def _end_metrics(run: Run, whole: RunMeter, memory: list[float]) -> dict[str, float]:
    """The whole run's FLOP accounting and peak memory (max over ranks), for MLflow."""
    tflops = model_tflops(run.flops.per_token, whole.tokens_per_s())
    return {
        "train_flops": run.flops.per_token * whole.units,
        "run_tflops": tflops,
        "run_mfu": mfu(tflops, run.peak_tflops, run.world),
        "peak_memory_mb": max(memory),
    }
