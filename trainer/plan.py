"""The compute planner: size, FLOPs, memory per rank, all-to-all traffic and a step-time bound.

Everything is arithmetic on the config; nothing is built or run. The estimates:

- **Parameters**: :func:`turnout.models.params.count_params` (total and active).
- **FLOPs**: :func:`turnout.models.flops.forward_flops` on one micro batch
  (``train.micro_batch_size`` x ``model.max_seq_len``), top-k MoD routing; training is
  3x forward. A step processes ``gpus x micro_batch_size x max_seq_len x grad_accum``
  tokens; every rank runs its own micro batches (experts included, balanced routing).
- **Model states per rank** (bytes per parameter): ``bf16`` keeps bf16 weights and
  gradients and an fp32 master copy plus the two fp32 Adam moments (2 + 2 + 12);
  ``fp32`` keeps fp32 weights and gradients and the moments (4 + 4 + 8); ``auto`` is
  bf16 on every device of the table. Dense parameters are data-parallel over all
  ``gpus``; each rank holds ``1/ep`` of every expert bank, data-parallel over the
  ``gpus / ep`` ranks of its expert-data-parallel group. ZeRO stage 1 shards the
  optimizer states over those groups, stage 2 the gradients too, stage 3 the weights
  too; stage 0 shards nothing.
- **Activations per micro batch** (saved for backward, no recomputation, fused attention
  that keeps no ``S x S`` scores), in the activation dtype (2 bytes for bf16):
  ``sum over blocks of rows(l) * (5 D + 2 G Hd + ffn(l)) + N * mod(l)``, plus
  ``N D`` for the embedding output and ``2 N V`` fp32 values for the logits and their
  softmax. ``N = B S`` tokens; ``rows(l)`` the tokens block ``l`` runs on
  (``B ceil(capacity S)`` for a MoD-routed block: the MoD reduction); attention saves
  its input, normed input, Q/K/V, output and projection (``5 D + 2 G Hd``); a dense
  FFN its input, normed input and the four SwiGLU tensors (``2 D + 4 F``); a MoE FFN
  the same per expert row (``r (2 D + 4 Fe)``) plus the router logits, ``r`` being the
  single-process dispatcher's rows at every ``ep`` (capacity mode: the ``E C`` bucket
  rows, padding included, even at ``ep > 1`` where only kept rows run and the FLOP count
  takes those; dropless: the ``k'`` real rows, :func:`turnout.models.flops.moe_rows`); a
  MoD-routed block also keeps, for all ``N`` tokens, its scattered output, router score
  and predictor hidden (``D + 1 + h``).
  With ``train.activation_checkpointing`` a recomputed block keeps only its input
  (``N D`` values) and its routing decisions (the tape of ``models/recompute.py``: 21
  bytes per expert choice and 8 per expert of a MoE layer, 9 per chosen MoD position
  and 1 per position), and the backward holds one recomputed block's activations at a
  time: the largest recomputed block's values are added once.
- **All-to-all** (``ep > 1`` only), per rank per step: each MoE layer exchanges its
  kept rows four times per micro step (dispatch and combine, forward and backward),
  ``D`` values each: ``min(k' T, E C)`` rows in capacity mode (no bucket padding
  travels), the ``k' T`` real rows dropless (``T`` the tokens reaching the layer, ``k'``
  as in :mod:`turnout.models.flops`). ``(ep - 1) / ep`` of it leaves the rank.
- **Step-time lower bound**: ``max(compute, all-to-all)``, compute = training FLOPs
  per rank at the device's dense peak, all-to-all = off-rank bytes at its link
  bandwidth. Data-parallel gradient traffic and kernel efficiency are not counted, so
  real steps are slower.

Shape legend: B micro batch, S sequence, D width, G KV heads, Hd head dim, F FFN
hidden, Fe expert hidden, E experts, V vocabulary, N = B S tokens of a micro batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from turnout.config.choices import Precision, Predictor
from turnout.config.model import BLOCK_KINDS, ModelConfig
from turnout.config.root import TurnoutConfig
from turnout.errors import ConfigError
from turnout.models.flops import (
    FlopCount,
    block_rows,
    dense_counterpart,
    forward_flops,
    moe_rows,
)
from turnout.models.params import ParamCount, count_params
from turnout.models.recompute import recomputes

GIB = 2**30


@dataclass(frozen=True)
class Device:
    """Vendor peak figures of one accelerator (dense, no sparsity)."""

    name: str
    bf16_tflops: float
    fp32_tflops: float
    link_gb_s: float
    """GPU-to-GPU link bandwidth (NVLink, all links, both directions), GB/s."""


#: Vendor datasheet figures: H100 SXM5 (NVIDIA H100 Tensor Core GPU datasheet): 989 TFLOP/s
#: dense BF16 (1979 with sparsity), 67 TFLOP/s FP32, NVLink 900 GB/s. H200 SXM (NVIDIA
#: H200 datasheet): the same compute, NVLink 900 GB/s. A100 SXM4 (NVIDIA A100 datasheet):
#: 312 TFLOP/s dense BF16, 19.5 TFLOP/s FP32, NVLink 600 GB/s. Intra-node figures: an
#: expert-parallel group spanning nodes is bound by the network instead.
DEVICES: dict[str, Device] = {
    "h100": Device("NVIDIA H100 SXM", 989.0, 67.0, 900.0),
    "h200": Device("NVIDIA H200 SXM", 989.0, 67.0, 900.0),
    "a100": Device("NVIDIA A100 SXM", 312.0, 19.5, 600.0),
}
DEFAULT_GPU = "h100"

#: Bytes per parameter: (weights, gradients, optimizer states) under AdamW.
STATE_BYTES: dict[str, tuple[int, int, int]] = {
    Precision.BF16.value: (2, 2, 12),  # bf16 weights and grads; fp32 master, m and v
    Precision.FP32.value: (4, 4, 8),  # fp32 weights and grads; fp32 m and v
}
#: Bytes of one activation value by precision.
ACT_BYTES = {Precision.BF16.value: 2, Precision.FP32.value: 4}
#: Expert-buffer exchanges per MoE layer per micro step: dispatch + combine, fwd + bwd.
A2A_PER_LAYER = 4


@dataclass(frozen=True)
class Memory:
    """Bytes per rank."""

    weights: float
    grads: float
    optimizer: float
    activations: float
    """Per micro batch (see the module docstring), checkpointing included."""

    @property
    def states(self) -> float:
        return self.weights + self.grads + self.optimizer

    @property
    def total(self) -> float:
        return self.states + self.activations


@dataclass(frozen=True)
class Plan:
    gpu: str
    device: Device
    gpus: int
    ep: int
    zero_stage: int
    precision: str
    """Resolved: 'bf16' or 'fp32'."""
    micro_batch: int
    seq_len: int
    grad_accum: int
    params: ParamCount
    flops: FlopCount
    dense_flops: FlopCount
    """The dense model of equal shape (every block dense, width ``ffn_dim``)."""
    memory: Memory
    dense_activations: float
    """Activation bytes per micro batch of the equal-shape dense model (same
    checkpointing mode; 'moe' recomputes none of its blocks)."""
    checkpointing: str
    """train.activation_checkpointing."""
    a2a_bytes: float
    """All-to-all buffer bytes per rank per step (its own slice included)."""

    @property
    def expert_dp(self) -> int:
        """Ranks sharing one expert slice (its data-parallel group)."""
        return self.gpus // self.ep

    @property
    def tokens_per_step(self) -> int:
        return self.gpus * self.micro_batch * self.seq_len * self.grad_accum

    @property
    def train_flops_per_step(self) -> float:
        """Training FLOPs of one optimizer step, all ranks."""
        return self.flops.train_per_token * self.tokens_per_step

    @property
    def a2a_link_bytes(self) -> float:
        """The all-to-all bytes that leave the rank per step."""
        return self.a2a_bytes * (self.ep - 1) / self.ep

    @property
    def peak_flops(self) -> float:
        tflops = self.device.bf16_tflops if self.precision == "bf16" else self.device.fp32_tflops
        return tflops * 1e12

    @property
    def compute_s(self) -> float:
        return self.train_flops_per_step / self.gpus / self.peak_flops

    @property
    def a2a_s(self) -> float:
        return self.a2a_link_bytes / (self.device.link_gb_s * 1e9)

    @property
    def step_s(self) -> float:
        """Step-time lower bound: the slower of compute at peak and all-to-all at link speed."""
        return max(self.compute_s, self.a2a_s)


def device(gpu: str) -> Device:
    """The table entry for ``gpu``; ConfigError naming ``--gpu`` when unknown."""
    if gpu not in DEVICES:
        raise ConfigError("--gpu", f"unknown device {gpu!r}; expected one of {', '.join(DEVICES)}")
    return DEVICES[gpu]


def resolve_precision(precision: str) -> str:
    """train.precision on a device of the table: 'auto' is bf16 (all of them have it)."""
    return Precision.BF16.value if precision == Precision.AUTO else str(precision)


def _block_values(cfg: ModelConfig, kind: str, seq_len: int, batch: int) -> tuple[float, float]:
    """Saved activation values of one block per micro batch: (routed rows, all tokens)."""
    D = cfg.d_model
    spec = BLOCK_KINDS[kind]
    rows = batch * block_rows(cfg, spec, seq_len)
    kv_dim = cfg.kv_heads() * (D // cfg.n_heads)
    attention = rows * (5 * D + 2 * kv_dim)
    if spec.has_moe:
        noop = cfg.noop_choices(spec)
        expert_rows = moe_rows(cfg, rows, noop)
        ffn = expert_rows * (2 * D + 4 * cfg.expert_hidden()) + rows * (cfg.moe.num_experts + noop)
    else:
        ffn = rows * (2 * D + 4 * cfg.ffn_dim)
    every = 0.0
    if spec.mod_routed:
        hidden = cfg.mod.predictor_hidden if cfg.mod.predictor == Predictor.MLP else 0
        every = batch * seq_len * (D + 1 + hidden)
    return attention + ffn, every


#: Bytes a checkpointed block's tape keeps per expert choice (expert id, slot: int64;
#: kept: bool; gate: fp32), per expert (the count: int64), per chosen MoD position (its
#: index: int64) and per position of a MoD block (the chosen mask: bool).
TAPE_CHOICE_BYTES, TAPE_EXPERT_BYTES, TAPE_CHOSEN_BYTES, TAPE_POSITION_BYTES = 21, 8, 8, 1


@dataclass(frozen=True)
class Activations:
    """Activation bytes of one micro batch."""

    kept: float
    """Saved for backward through the whole forward (a recomputed block: its input and
    routing decisions only)."""
    recompute: float
    """The largest recomputed block's activations, held while the backward recomputes it
    (0 without checkpointing)."""

    @property
    def total(self) -> float:
        return self.kept + self.recompute


def _tape_bytes(cfg: ModelConfig, kind: str, seq_len: int, batch: int) -> float:
    """Bytes of the routing decisions a recomputed block of ``kind`` keeps."""
    spec = BLOCK_KINDS[kind]
    rows = batch * block_rows(cfg, spec, seq_len)
    out = 0.0
    if spec.mod_routed:
        out += rows * TAPE_CHOSEN_BYTES + batch * seq_len * TAPE_POSITION_BYTES
    if spec.has_moe:
        noop = cfg.noop_choices(spec)
        out += rows * cfg.moe.top_k * TAPE_CHOICE_BYTES
        out += (cfg.moe.num_experts + noop) * TAPE_EXPERT_BYTES
    return out


def activations(
    cfg: ModelConfig, seq_len: int, batch: int, precision: str, checkpointing: str = "none"
) -> Activations:
    """Activation bytes of one micro batch (module docstring formula) under
    ``train.activation_checkpointing`` = ``checkpointing``."""
    act = ACT_BYTES[precision]
    N = batch * seq_len
    kept, largest = 0.0, 0.0
    for kind in cfg.block_kinds():
        block = act * sum(_block_values(cfg, kind, seq_len, batch))
        if recomputes(BLOCK_KINDS[kind], checkpointing):
            kept += act * N * cfg.d_model + _tape_bytes(cfg, kind, seq_len, batch)
            largest = max(largest, block)
        else:
            kept += block
    kept += act * N * cfg.d_model + 4 * 2 * N * cfg.vocab_size
    return Activations(kept, largest)


def activation_bytes(
    cfg: ModelConfig, seq_len: int, batch: int, precision: str, checkpointing: str = "none"
) -> float:
    """Activation bytes of one micro batch: kept through the forward plus one recomputed
    block (see :func:`activations`)."""
    return activations(cfg, seq_len, batch, precision, checkpointing).total


def state_memory(
    params: ParamCount, precision: str, zero_stage: int, gpus: int, ep: int
) -> tuple[float, float, float]:
    """(weights, grads, optimizer) bytes per rank under ZeRO ``zero_stage`` and ``ep``."""
    w_b, g_b, o_b = STATE_BYTES[precision]
    dense, experts = float(params.dense), params.experts / ep
    expert_dp = gpus // ep

    def held(stage: int) -> float:
        """Parameters a rank holds of a state ZeRO shards from ``stage`` on."""
        if zero_stage >= stage:
            return dense / gpus + experts / expert_dp
        return dense + experts

    return w_b * held(3), g_b * held(2), o_b * held(1)


def a2a_bytes(cfg: TurnoutConfig, precision: str) -> float:
    """All-to-all buffer bytes per rank per step (0 without expert parallelism)."""
    m = cfg.model
    if cfg.parallel.ep_size == 1:
        return 0.0
    B, S = cfg.train.micro_batch_size, m.max_seq_len
    values = 0.0
    for spec in m.blocks():
        if not spec.has_moe:
            continue
        rows = moe_rows(m, B * block_rows(m, spec, S), m.noop_choices(spec), False)
        values += rows * m.d_model  # the exchange sends kept rows only
    return A2A_PER_LAYER * values * ACT_BYTES[precision] * cfg.train.grad_accum


def plan(cfg: TurnoutConfig, gpus: int | None = None, gpu: str = DEFAULT_GPU) -> Plan:
    """The plan of training ``cfg`` on ``gpus`` devices (default ``launch.num_workers``)."""
    dev = device(gpu)
    world = cfg.launch.num_workers if gpus is None else gpus
    if world < 1:
        raise ConfigError("--gpus", f"must be >= 1, got {world}")
    ep = cfg.parallel.ep_size
    if world % ep:
        raise ConfigError("parallel.ep_size", f"{world} GPUs are not divisible by ep_size={ep}")
    precision = resolve_precision(cfg.train.precision)
    m, B, S = cfg.model, cfg.train.micro_batch_size, cfg.model.max_seq_len
    params = count_params(m)
    weights, grads, optimizer = state_memory(params, precision, cfg.parallel.zero_stage, world, ep)
    dense = dense_counterpart(m)
    ckpt = cfg.train.activation_checkpointing
    return Plan(
        gpu=gpu,
        device=dev,
        gpus=world,
        ep=ep,
        zero_stage=cfg.parallel.zero_stage,
        precision=precision,
        micro_batch=B,
        seq_len=S,
        grad_accum=cfg.train.grad_accum,
        params=params,
        flops=forward_flops(m, S, B, expert_padding=ep == 1),
        dense_flops=forward_flops(dense, S, B),
        memory=Memory(weights, grads, optimizer, activation_bytes(m, S, B, precision, ckpt)),
        dense_activations=activation_bytes(dense, S, B, precision, ckpt),
        checkpointing=ckpt,
        a2a_bytes=a2a_bytes(cfg, precision),
    )
