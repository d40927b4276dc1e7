"""What a training run builds once on every rank before its first step (:func:`setup`).

Seeds, the token data and its sampler, ``TransformerLM(cfg.model)`` (initialised from
``train.init_from`` when set, :mod:`turnout.trainer.weights.upcycle`), or, for the
function-name task (``data.structure: ast``), the structure cache, its sampler and the
structure model (:mod:`turnout.trainer.structure`), expert parallelism when
``groups.ep_size > 1``, the DeepSpeed engine, the MLflow run (opened on rank 0, or the
launcher's run attached to), this node's system-metrics sampler, the checkpoint run
folder, the training FLOPs per token (:mod:`turnout.trainer.metrics.compute`) and the device's
peak TFLOP/s (given, or probed on every rank at once). The loop itself is
:mod:`turnout.trainer.train`.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from turnout.config import TurnoutConfig
from turnout.errors import RunError
from turnout.models.lm import TransformerLM
from turnout.parallel.dist import all_reduce_sum, broadcast_object, device
from turnout.parallel.expert_parallel import install_expert_parallel
from turnout.parallel.groups import ParallelGroups
from turnout.trainer.data.batches import (
    BatchSampler,
    dataset_inputs,
    open_tokens,
    token_unigram_entropy,
    tracking_params,
)
from turnout.trainer.data.inputs import RunInputs
from turnout.trainer.engine import build_engine, use_bf16
from turnout.trainer.metrics.compute import RunFlops, probe_dtype, probe_peak_tflops, run_flops
from turnout.trainer.resume.recovery import run_folder
from turnout.trainer.structure.data import open_structure
from turnout.trainer.structure.flops import structure_run_flops
from turnout.trainer.structure.model import build_model
from turnout.trainer.structure.sampler import StructureSampler
from turnout.trainer.tracking.system import SystemMetrics
from turnout.trainer.tracking.tracker import Tracker
from turnout.trainer.trainable import apply_trainable
from turnout.trainer.weights.upcycle import init_from

log = logging.getLogger("turnout.trainer")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _start_tracking(cfg: TurnoutConfig, rank: int, world: int, attach_to: str) -> Tracker:
    """Collective: rank 0 opens (or attaches to) the MLflow run; if that fails, every rank
    raises together."""
    error = ""
    tracker: Tracker | None = None
    try:
        tracker = Tracker(cfg, rank, world, attach_to=attach_to)
    except Exception as e:  # an unreachable server, a bad store: stop all ranks, not just 0
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        error = f"cannot open the MLflow store {cfg.tracking.uri!r}: {first}"
    error = str(broadcast_object(error if rank == 0 else "", name="tracking start"))
    if error:
        raise RunError(error, key="tracking.uri")
    assert tracker is not None
    return tracker


def progress_bar(rank: int, total: int, initial: int) -> Any:
    """Rank 0's tqdm bar of optimizer steps (None on the other ranks)."""
    if rank != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


@dataclass
class Run:
    """What :func:`setup` builds once on this rank, before the first step."""

    cfg: TurnoutConfig
    groups: ParallelGroups
    engine: Any
    scheduler: torch.optim.lr_scheduler.LRScheduler
    sampler: BatchSampler | StructureSampler
    tracker: Tracker
    system: SystemMetrics
    """This node's system-metrics sampler (local rank 0; inactive elsewhere)."""
    run_dir: Path
    """Checkpoint folder of this run (the same on every rank)."""
    unigram_entropy: float
    flops: RunFlops
    """Training FLOPs per token of the model and of its equal-shape dense twin."""
    peak_tflops: float
    """Peak TFLOP/s of one rank (given or measured, the same on every rank)."""
    peak_measured: bool
    val_tokens_per_byte: float
    """Tokens per UTF-8 byte of the validation split (bits per byte = loss x this / ln 2)."""
    tokenizer_file: Path | None
    """The token cache's tokenizer.json, saved with every checkpoint (None: it has none)."""

    @property
    def rank(self) -> int:
        return self.groups.rank

    @property
    def world(self) -> int:
        return self.groups.world

    @property
    def structure(self) -> bool:
        """A function-name run: its unit is a syntax-tree node, not a token."""
        return isinstance(self.sampler, StructureSampler)

    @property
    def unit(self) -> str:
        return "node" if self.structure else "token"

    @property
    def tokens_per_step(self) -> int:
        """Tokens one optimizer step trains on, over all ranks (a structure run: the
        functions)."""
        t = self.cfg.train
        seq = 1 if self.structure else self.cfg.model.max_seq_len
        return t.micro_batch_size * t.grad_accum * seq * self.world

    def units(self, step: int) -> int:
        """What optimizer step ``step`` trains on over all ranks, in :attr:`unit` s."""
        if isinstance(self.sampler, StructureSampler):
            return self.sampler.step_nodes(step, self.tokens_per_step)
        return self.tokens_per_step


def setup(
    cfg: TurnoutConfig,
    data_path: Path,
    groups: ParallelGroups,
    attach_to: str = "",
    run_dir: Path | None = None,
) -> Run:
    """Collective: data, model (expert-parallel when ``groups`` say so), engine, MLflow run
    (opened here, or the launcher's run ``attach_to``); checkpoints go to ``run_dir``
    (None: a fresh folder under ``train.ckpt_dir``)."""
    t0 = time.perf_counter()
    rank, world = groups.rank, groups.world
    t = cfg.train
    seed_everything(t.seed)
    inputs = (
        open_structure(cfg, data_path, rank, world)
        if cfg.data.structure
        else _token_inputs(cfg, data_path, rank, world)
    )
    sampler = inputs.sampler
    model = build_model(cfg)
    if isinstance(model, TransformerLM):  # structure runs refuse it in the config
        model.set_activation_checkpointing(t.activation_checkpointing)
    if t.init_from and not t.resume:  # a resumed run has its own weights
        init_from(model, cfg)
    install_expert_parallel(model, groups)  # a no-op at ep_size 1
    apply_trainable(model, t.trainable)  # after EP, which rebuilds the expert parameters
    log.debug("rank %d: data and model ready after %.1fs", rank, time.perf_counter() - t0)
    engine, scheduler = build_engine(model, cfg, groups)
    log.debug("rank %d: engine ready after %.1fs", rank, time.perf_counter() - t0)
    tracker = _start_tracking(cfg, rank, world, attach_to)
    tracker.log_corpus(inputs.params, inputs.datasets)
    log.debug("rank %d: tracking ready after %.1fs", rank, time.perf_counter() - t0)
    run_id = str(broadcast_object(tracker.run_id if rank == 0 else "", name="run id"))
    system = SystemMetrics(cfg, run_id)
    here = str(run_dir or run_folder(cfg, run_id)) if rank == 0 else ""
    run_dir = Path(str(broadcast_object(here, name="run folder")))
    peak, measured = _peak_tflops(cfg, world)
    log.debug("rank %d: peak %.3f TFLOP/s after %.1fs", rank, peak, time.perf_counter() - t0)
    if isinstance(sampler, StructureSampler):
        flops = RunFlops(*structure_run_flops(cfg, sampler))
    else:
        flops = run_flops(cfg)
    return Run(
        cfg,
        groups,
        engine,
        scheduler,
        sampler,
        tracker,
        system,
        run_dir,
        inputs.baseline,
        flops,
        peak,
        measured,
        inputs.val_tokens_per_byte,
        inputs.tokenizer_file,
    )


def _token_inputs(cfg: TurnoutConfig, data_path: Path, rank: int, world: int) -> RunInputs:
    """The token cache, its sampler and what MLflow records of it."""
    t = cfg.train
    data = open_tokens(data_path, cfg.data.val_fraction)
    return RunInputs(
        BatchSampler(
            data, cfg.model.max_seq_len, t.micro_batch_size, rank, world, t.seed, t.eval_batches
        ),
        token_unigram_entropy(data.train, data.vocab_size),
        tracking_params(data),
        dataset_inputs(data),
        data.val_tokens_per_byte,
        data.tokenizer_file,
    )


def _peak_tflops(cfg: TurnoutConfig, world: int) -> tuple[float, bool]:
    """Collective when measured: (peak TFLOP/s of one rank, measured?). Every rank probes
    its own device at once (as they will train) and they agree on the mean."""
    if cfg.train.peak_tflops > 0:
        return cfg.train.peak_tflops, False
    dev = device()
    own = probe_peak_tflops(dev, probe_dtype(dev, use_bf16(cfg.train.precision)))
    total = all_reduce_sum(torch.tensor([own], dtype=torch.float64), "peak TFLOP/s probe")
    return float(total[0]) / world, True
