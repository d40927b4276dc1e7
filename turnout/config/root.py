"""The root configuration ``TurnoutConfig``: every section, and the cross-section checks.

It lives in the neutral ``turnout.config`` package with the section schemas, so that
every layer (models, parallel, trainer, launch) can type its ``cfg`` without importing
upward. Loading (presets, YAML files, overrides) is in :mod:`turnout.config.load`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from turnout.config.choices import Balance, Encoder, Placement, Recompute, Structure, Trainable
from turnout.config.model import ModelConfig, validate_model
from turnout.config.parallel import ParallelConfig, validate_parallel
from turnout.config.train import (
    DataConfig,
    TrackingConfig,
    TrainConfig,
    validate_data,
    validate_tracking,
    validate_train,
)
from turnout.errors import ConfigError


@dataclass
class LaunchConfig:
    num_workers: int = 2
    """Training processes (world size)."""
    use_gpu: bool = False
    """One GPU per worker (NCCL)."""
    cpus_per_worker: int = 1
    """CPUs Ray reserves per worker."""
    address: str = ""
    """Ray cluster to join ('' = RAY_ADDRESS if set, else an embedded local cluster)."""
    storage_path: str = ""
    """Where Ray Train keeps run state ('' = ./.turnout/ray)."""
    max_failures: int = 3
    """Worker-group restarts after a worker dies (resumed from the newest checkpoint);
    0 = fail the job on the first death."""
    placement: str = "PACK"
    """Worker placement on the cluster's nodes: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD."""
    preempt_grace_s: float = 0.0
    """Seconds SIGTERM (or Ctrl-C) leaves the job to finish its step and write a checkpoint
    before it gives up and exits 143 without one (0 = sized for the model: 30 s plus twice
    the checkpoint's bytes at the write speed measured in train.ckpt_dir); a value the
    checkpoint cannot be written in is refused before any worker starts."""
    allow_unauthenticated: bool = False
    """Join (or submit to) a Ray cluster without token authentication configured here
    (RAY_AUTH_MODE=token and the cluster's token); refused unless true (docs/security.md)."""


@dataclass
class TurnoutConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The language model."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Expert parallelism and ZeRO."""
    data: DataConfig = field(default_factory=DataConfig)
    """Corpus and tokenizer."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation, evaluation, checkpoints."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow."""
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    """Workers and the Ray cluster."""


def validate(cfg: TurnoutConfig) -> None:
    """All range and cross-field checks; raises ConfigError naming the key."""
    validate_model(cfg.model)
    if cfg.launch.num_workers < 1:
        raise ConfigError("launch.num_workers", f"must be >= 1, got {cfg.launch.num_workers}")
    if cfg.launch.cpus_per_worker < 1:
        raise ConfigError(
            "launch.cpus_per_worker", f"must be >= 1, got {cfg.launch.cpus_per_worker}"
        )
    if cfg.launch.max_failures < 0:
        raise ConfigError("launch.max_failures", f"must be >= 0, got {cfg.launch.max_failures}")
    if not (0 <= cfg.launch.preempt_grace_s < math.inf):  # also rejects nan
        raise ConfigError(
            "launch.preempt_grace_s", f"must be >= 0 seconds, got {cfg.launch.preempt_grace_s}"
        )
    if cfg.launch.placement not in Placement.values():
        raise ConfigError(
            "launch.placement", f"must be {Placement.spelled()}, got {cfg.launch.placement!r}"
        )
    validate_parallel(
        cfg.parallel, cfg.model.moe.num_experts, cfg.launch.num_workers, cfg.model.uses_moe()
    )
    if cfg.parallel.backend == "nccl" and not cfg.launch.use_gpu:
        raise ConfigError("parallel.backend", "nccl needs launch.use_gpu=true")
    validate_data(cfg.data)
    validate_train(cfg.train)
    _validate_structure_run(cfg)
    if cfg.train.activation_checkpointing == Recompute.MOE and not cfg.model.uses_moe():
        raise ConfigError(
            "train.activation_checkpointing",
            "'moe' recomputes the blocks with an MoE FFN and model.layer_pattern has none; "
            "use 'full' or 'none'",
        )
    if (
        cfg.train.trainable != Trainable.ALL
        and not cfg.model.structure.encoder
        and not _has_routers(cfg.model)
    ):
        raise ConfigError(
            "train.trainable",
            f"is {cfg.train.trainable!r} but model.layer_pattern has no routed block "
            "(mod, moe, mode, imode, ponder, recursion); use 'all' or add routing",
        )
    validate_tracking(cfg.tracking)


def _has_routers(model: ModelConfig) -> bool:
    """Whether the model has a router (MoD, MoE, a ponder halting head or a recursion
    router) to train."""
    return any(k.mod_routed or k.has_moe or k.ponder or k.recursion for k in model.blocks())


def _validate_structure_run(cfg: TurnoutConfig) -> None:
    """The function-name task (data.structure=ast) and its encoder go together; what the
    structure models do not have is refused here, naming the key."""
    enc = cfg.model.structure.encoder
    if enc not in Encoder.values():
        raise ConfigError("model.structure.encoder", f"must be {Encoder.spelled()}, got {enc!r}")
    if not enc:
        if cfg.data.structure:
            raise ConfigError(
                "model.structure.encoder",
                f"data.structure={cfg.data.structure} needs an encoder: 'treelstm', 'gnn' or "
                "'transformer'",
            )
        if cfg.model.structure.moe:
            raise ConfigError(
                "model.structure.moe", "is for a structure encoder (gnn, transformer)"
            )
        return
    if cfg.data.structure != Structure.AST:
        raise ConfigError(
            "data.structure", f"model.structure.encoder={enc} reads syntax trees: set it to 'ast'"
        )
    m = cfg.model
    if m.layer_pattern != ["dense"]:
        raise ConfigError(
            "model.layer_pattern",
            f"a structure encoder ({enc}) has no language-model blocks: set it to [dense] "
            "(MoE FFNs: model.structure.moe=true)",
        )
    if m.structure.moe and enc == Encoder.TREELSTM:
        raise ConfigError("model.structure.moe", "the Tree-LSTM has no FFN; use gnn or transformer")
    if m.structure.moe and m.moe.balance != Balance.AUX:
        raise ConfigError("model.moe.balance", "structure models balance experts with 'aux' only")
    if m.structure.moe and m.moe.hyper.enabled:
        raise ConfigError("model.moe.hyper.enabled", "hyper-experts are for language models")
    if m.structure.moe and m.moe.num_noop_experts:
        raise ConfigError("model.moe.num_noop_experts", "no-op experts are for language models")
    if cfg.data.tokenizer != "byte":
        raise ConfigError(
            "data.tokenizer",
            "the function-name task reads node labels as bytes: 'byte' only (a checkpoint "
            "of it carries no tokenizer.json yet)",
        )
    if enc == Encoder.TREELSTM and cfg.parallel.zero_stage == 3:
        raise ConfigError(
            "parallel.zero_stage",
            "ZeRO-3 gathers a weight at each call, and the Tree-LSTM calls its cell once per "
            "tree level, a number that differs between ranks: use 0, 1 or 2",
        )
    refused = {
        "tracking.register_as": cfg.tracking.register_as,
        "data.val_corpus": cfg.data.val_corpus,
        "train.init_from": cfg.train.init_from,
        "train.trainable": cfg.train.trainable != Trainable.ALL,
        "train.activation_checkpointing": cfg.train.activation_checkpointing != Recompute.NONE,
    }
    for key, value in refused.items():
        if value:
            raise ConfigError(
                key, "is not supported with data.structure=ast (the function-name task)"
            )
