"""Data, training and tracking configuration (omegaconf structured dataclasses)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from turnout.config.choices import Precision, Recompute, Structure, Trainable
from turnout.config.structure import AstConfig, validate_structure
from turnout.errors import ConfigError


@dataclass
class DataConfig:
    corpus: str = "stdlib"
    """'stdlib' (this Python's own standard-library sources, on disk everywhere), or a
    text file, a folder, a JSONL / JSONL.gz / Parquet file, or a glob of them
    ('/data/shard-*.parquet'); the format follows each file's suffix."""
    text_field: str = "text"
    """The JSON field / Parquet column holding a document's text."""
    val_corpus: str = ""
    """A separate validation corpus (same forms as data.corpus); '' = hold out the tail
    data.val_fraction of data.corpus."""
    max_bytes: int = 16_000_000
    """Read at most this many bytes of the corpus (0 = all)."""
    val_fraction: float = 0.02
    """Fraction of the token stream held out for validation (the tail), without
    data.val_corpus."""
    cache_dir: str = ".turnout_cache"
    """Where the memory-mapped token cache (and a trained BPE) is written, keyed by a
    corpus fingerprint."""
    tokenizer: str = "byte"
    """'byte' (each UTF-8 byte is a token, vocab 256), 'bpe' (a byte-level BPE of
    model.vocab_size tokens trained on the corpus, cached), or a path to a Hugging Face
    tokenizer.json."""
    eod_token: str = ""
    """The end-of-document token of a tokenizer.json ('' = the first of <|endoftext|>,
    </s>, <|end_of_text|>, <eos> it has). 'byte' uses byte 0, 'bpe' <|endoftext|>."""
    bpe_train_bytes: int = 100_000_000
    """data.tokenizer=bpe learns its merges from at most this many bytes of the corpus."""
    workers: int = 0
    """Tokenizer processes, one shard each at a time (0 = one per CPU core)."""
    structure: str = ""
    """'' (train on the token stream) or 'ast': parse the corpus's Python files and train
    model.structure.encoder to predict each function's name from its body."""
    ast: AstConfig = field(default_factory=AstConfig)
    """How functions become examples (data.structure=ast)."""


#: ``train.resume`` value: the newest checkpoint of a run of the same config, or fresh.
RESUME_AUTO = "auto"


@dataclass
class TrainConfig:
    steps: int = 300
    """Optimizer steps."""
    micro_batch_size: int = 8
    """Sequences (a function-name run: functions) per rank per micro step."""
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
    keep_checkpoints: int = 0
    """Keep the newest N complete checkpoints of the run folder and delete older ones
    after each save (0 = keep all); train.keep_every names ones to keep as well."""
    keep_every: int = 0
    """With train.keep_checkpoints: also keep every checkpoint whose step is a multiple of
    M, however old (0 = none)."""
    ckpt_dir: str = "checkpoints"
    """Where checkpoints are written (one folder per run)."""
    resume: str = ""
    """Checkpoint folder to resume from ('' = start fresh; 'auto' = the newest complete
    checkpoint in train.ckpt_dir that a run of this same config saved, else start fresh:
    a scheduler re-running one command line continues)."""
    init_from: str = ""
    """Initialise the model weights (not the optimizer) from a checkpoint (run or step
    folder), a `turnout export` folder or a Hugging Face folder: equal shapes copy, a dense
    FFN becomes every expert of a MoE layer, E experts become m*E copies, a dense block
    becomes a MoD-routed one (a new zero router) ('' = random init; ignored when
    resuming)."""
    trainable: str = "all"
    """Which parameters train: 'all', 'routers' (MoD routers and predictors, MoE routers,
    ponder halting heads) or 'routers+norms' (and every RMSNorm weight); the others are
    frozen (no gradient, no optimizer state, bit-equal after every step). For retrofitting
    routing onto a trained model (``init_from``)."""
    upcycle_noise: float = 0.0
    """Std of the multiplicative noise w * (1 + N(0, std^2)) put on every upcycled expert
    weight (0 = exact copies)."""
    upcycle_reinit: float = 0.0
    """Drop-Upcycling: fraction of each upcycled expert's hidden units whose weights are
    re-drawn from a normal with the source weight's mean and std (0 = none)."""
    seed: int = 1234
    """Seed for weights and data order."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s of one rank's device, the denominator of the MFU (0 = measure it once
    at start with a short matmul probe on each rank's device)."""
    max_consecutive_skipped_steps: int = 10
    """Stop every rank when more optimizer steps than this in a row are skipped
    (non-finite gradients: the model is diverging); skipped steps are logged."""
    activation_checkpointing: str = "none"
    """'none', 'moe' (blocks with an MoE FFN keep only their input and run again in the
    backward, replaying the forward's routing decisions) or 'full' (every block)."""


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
    load_image_every: int = 100
    """Log the expert-load heatmap (MoE layer x expert, load over mean) as an MLflow image
    at the first log step at or after every N steps, and at the last step (0 = never)."""
    expert_series_max: int = 64
    """Log one load series per expert (layer<i>/expert<e>_load) only while the MoE layers'
    experts number at most this in total (0 = never); the summaries are always logged."""
    run_id: str = ""
    """Append to this existing MLflow run ('' = a new run, or the run that wrote the
    train.resume checkpoint)."""
    parent_run_id: str = ""
    """Open a new run as a child of this MLflow run ('' = a top-level run); turnout sweep
    sets it to the sweep's run."""
    flush_timeout_s: float = 30.0
    """At the end of a run, wait at most this long for the MLflow store to take the
    queued metrics; the rest go to a local file named in a warning."""
    system_metrics: bool = True
    """Log MLflow system metrics (CPU, memory, GPU) from one process per node."""
    log_model: bool = True
    """At the end of a run (after the final checkpoint), log the model to the run as an
    MLflow logged model with a pyfunc flavour that generates text (`mlflow models
    serve`-able); the run's final-step metrics are linked to it."""
    log_model_max_mb: float = 1024.0
    """A logged model whose weights take at most this many MiB is copied into the artifact
    store; a larger one is logged by reference to its checkpoint (or export) folder, not
    copied, and loads only while that folder exists (0 = always by reference)."""
    register_as: str = ""
    """Register the logged model in the MLflow model registry under this name (a new
    version each run; '' = do not register)."""


def validate_data(cfg: DataConfig) -> None:
    if cfg.max_bytes < 0:
        raise ConfigError("data.max_bytes", f"must be >= 0, got {cfg.max_bytes}")
    if not (0.0 < cfg.val_fraction < 0.5):
        raise ConfigError("data.val_fraction", f"must be in (0, 0.5), got {cfg.val_fraction}")
    if not cfg.tokenizer.strip():
        raise ConfigError("data.tokenizer", "must be 'byte', 'bpe' or a tokenizer.json path")
    if not cfg.text_field:
        raise ConfigError("data.text_field", "must not be empty")
    for name in ("bpe_train_bytes", "workers"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"data.{name}", f"must be >= 0, got {getattr(cfg, name)}")
    if cfg.structure not in Structure.values():
        raise ConfigError("data.structure", f"must be {Structure.spelled()}, got {cfg.structure!r}")
    validate_structure(cfg.ast)


def validate_vocab(cfg: DataConfig, vocab_size: int) -> None:
    """The checks of model.vocab_size that need no file: byte needs its 256 ids (more are
    allowed and never produced: a padded head, or a planner's what-if), a BPE needs its
    256-byte alphabet, the end-of-document token and some merges."""
    if cfg.tokenizer == "byte" and vocab_size < 256:
        raise ConfigError(
            "model.vocab_size",
            f"data.tokenizer=byte needs 256 token ids, got vocab_size {vocab_size}",
        )
    if cfg.tokenizer == "bpe" and not (512 <= vocab_size <= 2**31 - 1):
        raise ConfigError(
            "model.vocab_size",
            f"data.tokenizer=bpe learns model.vocab_size tokens; {vocab_size} is too small "
            "(at least 512, e.g. 8192)",
        )


def validate_tracking(cfg: TrackingConfig) -> None:
    for name in ("load_image_every", "expert_series_max"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"tracking.{name}", f"must be >= 0, got {getattr(cfg, name)}")
    if not (0 <= cfg.flush_timeout_s < math.inf):  # also rejects nan
        raise ConfigError(
            "tracking.flush_timeout_s", f"must be >= 0 seconds, got {cfg.flush_timeout_s}"
        )
    if not (0 <= cfg.log_model_max_mb < math.inf):  # also rejects nan
        raise ConfigError(
            "tracking.log_model_max_mb", f"must be >= 0 MiB, got {cfg.log_model_max_mb}"
        )
    if cfg.register_as:
        check_model_name(cfg.register_as, "tracking.register_as")
        if not (cfg.enabled and cfg.log_model):
            raise ConfigError(
                "tracking.register_as", "needs tracking.enabled=true and tracking.log_model=true"
            )


def check_model_name(name: str, key: str) -> None:
    """ConfigError naming ``key`` unless MLflow's registry takes ``name`` (not blank, no
    '/' or ':', as ``mlflow.utils.validation._validate_model_name`` requires)."""
    if not name.strip() or "/" in name or ":" in name:
        raise ConfigError(key, f"{name!r} cannot name a registered model (blank, '/' or ':')")


def validate_train(cfg: TrainConfig) -> None:
    for name in ("steps", "micro_batch_size", "grad_accum", "eval_batches", "log_every"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"train.{name}", f"must be >= 1, got {getattr(cfg, name)}")
    for name in ("warmup_steps", "eval_every", "ckpt_every", "keep_checkpoints", "keep_every"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"train.{name}", f"must be >= 0, got {getattr(cfg, name)}")
    if cfg.keep_every and not cfg.keep_checkpoints:
        raise ConfigError(
            "train.keep_every",
            f"is {cfg.keep_every} but train.keep_checkpoints is 0, which keeps every "
            "checkpoint already; set train.keep_checkpoints=N to prune",
        )
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
    if not (0 <= cfg.upcycle_noise < math.inf):
        raise ConfigError("train.upcycle_noise", f"must be >= 0, got {cfg.upcycle_noise}")
    if cfg.trainable not in Trainable.values():
        raise ConfigError(
            "train.trainable", f"must be {Trainable.spelled()}, got {cfg.trainable!r}"
        )
    if not (0 <= cfg.upcycle_reinit <= 1):
        raise ConfigError("train.upcycle_reinit", f"must be in [0, 1], got {cfg.upcycle_reinit}")
    if cfg.max_consecutive_skipped_steps < 0:
        raise ConfigError(
            "train.max_consecutive_skipped_steps",
            f"must be >= 0, got {cfg.max_consecutive_skipped_steps}",
        )
    if cfg.grad_clip < 0:
        raise ConfigError("train.grad_clip", f"must be >= 0, got {cfg.grad_clip}")
    if cfg.activation_checkpointing not in Recompute.values():
        raise ConfigError(
            "train.activation_checkpointing",
            f"must be {Recompute.spelled()}, got {cfg.activation_checkpointing!r}",
        )
    if cfg.precision not in Precision.values():
        raise ConfigError(
            "train.precision", f"must be {Precision.spelled()}, got {cfg.precision!r}"
        )
