"""The training loop; runs on every rank inside one process group.

``train(cfg, data_path, groups)`` runs inside the process group the worker entry created
(``init_distributed``), with the parallel groups it built once (``build_groups``). It
seeds, builds ``TransformerLM(cfg.model)``, installs expert parallelism when
``groups.ep_size > 1`` and builds the DeepSpeed engine, then for each optimizer step
runs ``train.grad_accum`` micro steps on this rank's shard. After every micro step's
forward one all-reduce carries a per-rank non-finite flag (and the loss for logging), so
when any rank sees a NaN/inf loss EVERY rank raises :class:`NonFiniteLossError` at the
same point, before the backward. It logs every ``log_every`` steps (MLflow on rank 0, a
tqdm bar on rank 0), validates every ``eval_every`` steps and at the end (loss averaged
over all ranks), checkpoints every ``ckpt_every`` steps and at the end, and resumes from
``train.resume``.
"""

from __future__ import annotations

import datetime as _dt
import logging
import random
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from turnout.config import TurnoutConfig
from turnout.errors import ConfigError
from turnout.models.lm import TransformerLM
from turnout.parallel.dist import all_reduce_sum, broadcast_object
from turnout.parallel.expert_parallel import install_expert_parallel
from turnout.parallel.groups import ParallelGroups
from turnout.trainer import checkpoint
from turnout.trainer.data import BatchSampler, byte_unigram_entropy, open_tokens
from turnout.trainer.engine import build_engine
from turnout.trainer.metrics import StatsAccumulator
from turnout.trainer.tracking import Tracker

log = logging.getLogger("turnout.trainer")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite on some rank; every rank raises it together."""

    def __init__(self, step: int, ranks: list[int], world: int) -> None:
        super().__init__(
            f"non-finite loss at step {step} on rank(s) {ranks}: stopped all {world} ranks "
            "(lower train.lr or raise train.warmup_steps)"
        )
        self.step = step
        self.ranks = ranks


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
    final_val_loss_causal: float = float("nan")
    """Validation loss with causal MoD decisions (the predictor), as when sampling."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _run_dir(cfg: TurnoutConfig, run_id: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = cfg.tracking.run_name or "run"
    suffix = run_id[:8] if run_id else secrets.token_hex(4)
    return Path(cfg.train.ckpt_dir).expanduser().resolve() / f"{name}-{stamp}-{suffix}"


@torch.no_grad()
def evaluate(engine: Any, sampler: BatchSampler, batches: int, routing: str) -> float:
    """Collective: mean validation cross-entropy over all ranks' fixed windows."""
    engine.eval()
    total = 0.0
    for i in range(batches):
        tokens, targets = sampler.eval_batch(i)
        out = engine(tokens.to(engine.device), targets.to(engine.device), routing=routing)
        total += float(out.ce)
    engine.train()
    mean = all_reduce_sum(torch.tensor([total / batches], dtype=torch.float64))
    world = torch.distributed.get_world_size()
    return float(mean[0]) / world


def _start_tracking(cfg: TurnoutConfig, rank: int, world: int) -> Tracker:
    """Collective: rank 0 opens the MLflow run; if that fails, every rank raises together."""
    error = ""
    tracker: Tracker | None = None
    try:
        tracker = Tracker(cfg, rank, world)
    except Exception as e:  # an unreachable server, a bad store: stop all ranks, not just 0
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        error = f"cannot open the MLflow store {cfg.tracking.uri!r}: {first}"
    error = str(broadcast_object(error if rank == 0 else ""))
    if error:
        raise ConfigError("tracking.uri", error)
    assert tracker is not None
    return tracker


def _progress(rank: int, total: int, initial: int) -> Any:
    if rank != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def train(cfg: TurnoutConfig, data_path: Path, groups: ParallelGroups) -> TrainResult:
    """Train on every rank (collective); see the module docstring."""
    t_start = time.perf_counter()
    rank, world = groups.rank, groups.layout.world
    t = cfg.train
    seed_everything(t.seed)
    data = open_tokens(data_path, cfg.data.val_fraction)
    seq_len = cfg.model.max_seq_len
    sampler = BatchSampler(data, seq_len, t.micro_batch_size, rank, world, t.seed, t.eval_batches)
    entropy = byte_unigram_entropy(data.train, data.vocab_size)
    model = TransformerLM(cfg.model)
    install_expert_parallel(model, groups)  # a no-op at ep_size 1
    log.debug("rank %d: data and model ready after %.1fs", rank, time.perf_counter() - t_start)
    engine, scheduler = build_engine(model, cfg, groups)
    log.debug("rank %d: engine ready after %.1fs", rank, time.perf_counter() - t_start)
    tracker = _start_tracking(cfg, rank, world)
    log.debug("rank %d: tracking ready after %.1fs", rank, time.perf_counter() - t_start)
    run_dir = Path(str(broadcast_object(str(_run_dir(cfg, tracker.run_id)) if rank == 0 else "")))
    tokens_per_step = t.micro_batch_size * t.grad_accum * seq_len * world
    uses_mod = cfg.model.uses_mod()
    stats = StatsAccumulator()
    train_time, first_step_time = 0.0, 0.0
    interval_time, interval_ce, interval_steps = 0.0, 0.0, 0
    final_train, val, val_causal = float("nan"), float("nan"), float("nan")
    ckpt = ""
    bar = None
    status = "FAILED"
    start = 0
    try:
        if t.resume:
            start = int(checkpoint.load(engine, t.resume, groups).get("step", 0))
        tracker.log_metrics({"unigram_entropy": entropy}, step=start)
        bar = _progress(rank, t.steps, start)
        for step in range(start, t.steps):
            done = step + 1
            last = done == t.steps
            lr = float(scheduler.get_last_lr()[0])
            t0 = time.perf_counter()
            step_ce = 0.0
            for micro in range(t.grad_accum):
                tokens, targets = sampler.batch(step, micro)
                out = engine(tokens.to(engine.device), targets.to(engine.device))
                # One collective per micro step: who saw a non-finite loss, and the ce sum.
                flags = torch.zeros(world + 1, dtype=torch.float64)
                flags[rank] = 0.0 if bool(torch.isfinite(out.loss)) else 1.0
                flags[world] = float(out.ce)
                flags = all_reduce_sum(flags)
                if flags[:world].sum() > 0:
                    bad = [r for r in range(world) if flags[r] > 0]
                    raise NonFiniteLossError(done, bad, world)
                engine.backward(out.loss)
                engine.step()
                stats.add(out)
                step_ce += float(flags[world]) / world / t.grad_accum
            dt = time.perf_counter() - t0
            train_time += dt
            if step == start:
                first_step_time = dt
            interval_time += dt
            interval_ce += step_ce
            interval_steps += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{step_ce:.3f}", lr=f"{lr:.2e}")
            if done % t.log_every == 0 or last:
                metrics = stats.reduce()
                final_train = interval_ce / interval_steps
                norm = engine.get_global_grad_norm()
                metrics.update(
                    loss=final_train,
                    lr=lr,
                    tokens_per_s=tokens_per_step * interval_steps / max(interval_time, 1e-9),
                )
                if norm is not None:
                    metrics["grad_norm"] = float(norm)
                tracker.log_metrics(metrics, step=done)
                interval_time, interval_ce, interval_steps = 0.0, 0.0, 0
            if (t.eval_every and done % t.eval_every == 0) or last:
                val = evaluate(engine, sampler, t.eval_batches, "topk")
                metrics = {"val_loss": val}
                if uses_mod:
                    val_causal = evaluate(engine, sampler, t.eval_batches, "causal")
                    metrics["val_loss_causal"] = val_causal
                tracker.log_metrics(metrics, step=done)
                if bar is not None:
                    bar.write(f"step {done}: val_loss {val:.4f} (unigram entropy {entropy:.4f})")
            if (t.ckpt_every and done % t.ckpt_every == 0) or last:
                state = {"step": done, "seed": t.seed, "world_size": world}
                t_ckpt = time.perf_counter()
                ckpt = str(checkpoint.save(engine, run_dir, done, state, groups))
                log.debug("rank %d: checkpoint %.1fs", rank, time.perf_counter() - t_ckpt)
        status = "FINISHED"
        log.debug("rank %d: loop done after %.1fs", rank, time.perf_counter() - t_start)
    finally:
        if bar is not None:
            bar.close()
        tracker.finish(status)
    steps_run = t.steps - start
    if steps_run > 1:
        steps_run, train_time = steps_run - 1, train_time - first_step_time
    return TrainResult(
        final_train_loss=final_train,
        final_val_loss=val,
        unigram_entropy=entropy,
        steps=t.steps,
        tokens_per_s=tokens_per_step * steps_run / train_time if train_time > 0 else 0.0,
        wall_s=time.perf_counter() - t_start,
        run_id=tracker.run_id,
        checkpoint=ckpt,
        final_val_loss_causal=val_causal if uses_mod else float("nan"),
    )
