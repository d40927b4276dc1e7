"""Data, training and tracking configuration (omegaconf structured dataclasses)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from turnout.config.choices import Precision
from turnout.errors import ConfigError


@dataclass
class DataConfig:
    corpus: str = "stdlib"
    """'stdlib' (this Python's own standard-library sources, on disk everywhere) or a
    path to a text file or a directory of text files."""
    max_bytes: int = 16_000_000
    """Read at most this many bytes of the corpus (0 = all)."""
    val_fraction: float = 0.02
    """Fraction of the token stream held out for validation (the tail)."""
    cache_dir: str = ".turnout_cache"
    """Where the memory-mapped token cache is written (keyed by a corpus fingerprint)."""
    tokenizer: str = "byte"
    """Tokenizer; 'byte' maps each UTF-8 byte to one token (vocab 256)."""


@dataclass
class TrainConfig:
    steps: int = 300
    """Optimizer steps."""
    micro_batch_size: int = 8
    """Sequences per rank per micro step."""
    grad_accum: int = 1
    """Micro steps per optimizer step."""
    lr: float = 3e-3
    """Peak learning rate (AdamW)."""
    min_lr: float = 3e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 30
    """Linear warmup steps."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to norms and biases)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    precision: str = "auto"
    """'auto' (bf16 on GPUs that support it, else fp32), 'bf16' or 'fp32'."""
    eval_every: int = 100
    """Validation every N steps (and at the end); 0 = only at the end."""
    eval_batches: int = 8
    """Micro batches per validation pass, per rank."""
    log_every: int = 10
    """Log metrics every N steps."""
    ckpt_every: int = 0
    """Checkpoint every N steps (0 = only at the end)."""
    ckpt_dir: str = "checkpoints"
    """Where checkpoints are written (one folder per run)."""
    resume: str = ""
    """Checkpoint folder to resume from ('' = start fresh)."""
    seed: int = 1234
    """Seed for weights and data order."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s of one rank's device, the denominator of the MFU (0 = measure it once
    at start with a short matmul probe on each rank's device)."""
    max_consecutive_skipped_steps: int = 10
    """Stop every rank when more optimizer steps than this in a row are skipped
    (non-finite gradients: the model is diverging); skipped steps are logged."""


@dataclass
class TrackingConfig:
    enabled: bool = True
    """Log to MLflow (rank 0 only)."""
    uri: str = "sqlite:///mlflow.db"
    """MLflow tracking URI: a local store by default, or a tracking server's URI."""
    experiment: str = "turnout"
    """MLflow experiment name."""
    run_name: str = ""
    """MLflow run name ('' = generated)."""
    run_id: str = ""
    """Append to this existing MLflow run ('' = a new run, or the run that wrote the
    train.resume checkpoint)."""
    flush_timeout_s: float = 30.0
    """At the end of a run, wait at most this long for the MLflow store to take the
    queued metrics; the rest go to a local file named in a warning."""
    system_metrics: bool = True
    """Log MLflow system metrics (CPU, memory, GPU) from one process per node."""


def validate_data(cfg: DataConfig) -> None:
    if cfg.max_bytes < 0:
        raise ConfigError("data.max_bytes", f"must be >= 0, got {cfg.max_bytes}")
    if not (0.0 < cfg.val_fraction < 0.5):
        raise ConfigError("data.val_fraction", f"must be in (0, 0.5), got {cfg.val_fraction}")
    if cfg.tokenizer != "byte":
        raise ConfigError("data.tokenizer", f"only 'byte' is supported, got {cfg.tokenizer!r}")


def validate_tracking(cfg: TrackingConfig) -> None:
    if not (0 <= cfg.flush_timeout_s < math.inf):  # also rejects nan
        raise ConfigError(
            "tracking.flush_timeout_s", f"must be >= 0 seconds, got {cfg.flush_timeout_s}"
        )


def validate_train(cfg: TrainConfig) -> None:
    for name in ("steps", "micro_batch_size", "grad_accum", "eval_batches", "log_every"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"train.{name}", f"must be >= 1, got {getattr(cfg, name)}")
    for name in ("warmup_steps", "eval_every", "ckpt_every"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"train.{name}", f"must be >= 0, got {getattr(cfg, name)}")
    if cfg.lr <= 0:
        raise ConfigError("train.lr", f"must be > 0, got {cfg.lr}")
    if not (0 <= cfg.min_lr <= cfg.lr):
        raise ConfigError("train.min_lr", f"must be in [0, lr={cfg.lr}], got {cfg.min_lr}")
    if cfg.weight_decay < 0:
        raise ConfigError("train.weight_decay", f"must be >= 0, got {cfg.weight_decay}")
    if len(cfg.betas) != 2 or not all(0 <= b < 1 for b in cfg.betas):
        raise ConfigError("train.betas", f"must be two numbers in [0, 1), got {list(cfg.betas)}")
    if not (0 <= cfg.peak_tflops < math.inf):  # also rejects nan
        raise ConfigError("train.peak_tflops", f"must be >= 0, got {cfg.peak_tflops}")
    if cfg.max_consecutive_skipped_steps < 0:
        raise ConfigError(
            "train.max_consecutive_skipped_steps",
            f"must be >= 0, got {cfg.max_consecutive_skipped_steps}",
        )
    if cfg.grad_clip < 0:
        raise ConfigError("train.grad_clip", f"must be >= 0, got {cfg.grad_clip}")
    if cfg.precision not in Precision.values():
        raise ConfigError(
            "train.precision", f"must be {Precision.spelled()}, got {cfg.precision!r}"
        )
