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
  ``sum over blocks of rows(l) * (4 D + H Hd + 2 G Hd + ffn(l)) + N * mod(l)``, plus
  ``N D`` for the embedding output and ``2 N V`` fp32 values for the logits and their
  softmax. ``N = B S`` tokens; ``rows(l)`` the tokens block ``l`` runs on
  (``B ceil(capacity S)`` for a MoD-routed block: the MoD reduction); attention saves
  its input, normed input, Q/K/V, output and projection (``4 D + H Hd + 2 G Hd``,
  ``H Hd = D`` unless ``model.head_dim`` is set); a dense FFN its input, normed input
  and the four SwiGLU tensors (``2 D + 4 F``); a MoE FFN the same per expert row
  (``r (2 D + 4 Fe)``) plus the router logits (and, with ``moe.shared_experts``, the
  shared SwiGLU's four tensors and output on every row, ``D + 4 Fs``), ``r`` being the
  kept rows the experts compute at every ``ep`` (:func:`turnout.models.flops.moe_rows`:
  ``min(k' T, E C)`` in capacity mode, ``k' T`` dropless, no bucket padding); a
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
- **Checkpoint bytes**: every parameter's fp32 master and its two AdamW moments (12
  bytes per parameter, experts included), the size of a step folder
  (:mod:`turnout.trainer.checkpointing.collective`) give or take its small files.
- **Step-time lower bound**: ``max(compute, all-to-all)``, compute = training FLOPs
  per rank at the device's dense peak, all-to-all = off-rank bytes at its link
  bandwidth. Data-parallel gradient traffic and kernel efficiency are not counted, so
  real steps are slower.

Shape legend: B micro batch, S sequence, D width, G KV heads, Hd head dim, F FFN
hidden, Fe expert hidden, E experts, V vocabulary, N = B S tokens of a micro batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from turnout.config.root import TurnoutConfig
from turnout.errors import ConfigError
from turnout.models.flops import (
    FlopCount,
    dense_counterpart,
    forward_flops,
)
from turnout.models.params import ParamCount, count_params
from turnout.trainer.planner.devices import DEFAULT_GPU, Device, device, resolve_precision
from turnout.trainer.planner.memory import Memory, a2a_bytes, activation_bytes, state_memory

#: Bytes a checkpoint keeps per parameter: the fp32 master and two fp32 AdamW moments.
CHECKPOINT_BYTES_PER_PARAM = 12


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
    def checkpoint_bytes(self) -> int:
        """Bytes of one checkpoint (every parameter's master and moments, fp32)."""
        return self.params.total * CHECKPOINT_BYTES_PER_PARAM

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
        flops=forward_flops(m, S, B),
        dense_flops=forward_flops(dense, S, B),
        memory=Memory(weights, grads, optimizer, activation_bytes(m, S, B, precision, ckpt)),
        dense_activations=activation_bytes(dense, S, B, precision, ckpt),
        checkpointing=ckpt,
        a2a_bytes=a2a_bytes(cfg, precision),
    )
