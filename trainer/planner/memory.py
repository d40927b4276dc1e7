"""The planner's memory model: model states and activations per rank, all-to-all bytes.

The formulas, and what each leaves out, are in :mod:`turnout.trainer.planner.plan`'s
docstring; this file is their arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

from turnout.config.choices import Precision, Predictor, RecursionCache, RecursionRouting
from turnout.config.model import BLOCK_KINDS, ModelConfig
from turnout.config.root import TurnoutConfig
from turnout.models.flops import block_rows, moe_rows
from turnout.models.params import ParamCount
from turnout.models.recompute import recomputes
from turnout.models.routing import mod_capacity

GIB = 2**30


#: Bytes per parameter: (weights, gradients, optimizer states) under AdamW.
STATE_BYTES: dict[str, tuple[int, int, int]] = {
    Precision.BF16.value: (2, 2, 12),  # bf16 weights and grads; fp32 master, m and v
    Precision.FP32.value: (4, 4, 8),  # fp32 weights and grads; fp32 m and v
}
#: Bytes of one activation value by precision.
ACT_BYTES = {Precision.BF16.value: 2, Precision.FP32.value: 4}
#: Expert-buffer exchanges per MoE layer per micro step: dispatch + combine, fwd + bwd.
A2A_PER_LAYER = 4

#: Bytes a checkpointed block's tape keeps per expert choice (expert id, slot: int64;
#: kept: bool; gate: fp32), per expert (the count: int64), per chosen MoD position (its
#: index: int64) and per position of a MoD block (the chosen mask: bool).
TAPE_CHOICE_BYTES, TAPE_EXPERT_BYTES, TAPE_CHOSEN_BYTES, TAPE_POSITION_BYTES = 21, 8, 8, 1


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


def hyper_values(cfg: ModelConfig) -> float:
    """Saved values per row of a MoE layer's hyper-expert adapter (0 when off): the
    probabilities and weights of the condition (3 E), the condition (C), the
    hypernetwork's features before and after GELU (2 H), the down projection and the
    outer product (2 H r), the adapter's bottleneck before and after GELU (2 r) and its
    output (D)."""
    h = cfg.moe.hyper
    if not h.enabled:
        return 0.0
    E, C, H, r = cfg.moe.num_experts, h.embed_dim, h.hidden, h.rank
    return 3 * E + C + 2 * H + 2 * H * r + 2 * r + cfg.d_model


def _block_values(cfg: ModelConfig, kind: str, seq_len: int, batch: int) -> tuple[float, float]:
    """Saved activation values of one block per micro batch: (routed rows, all tokens)."""
    D = cfg.d_model
    spec = BLOCK_KINDS[kind]
    if spec.recursion:
        return _recursion_values(cfg, seq_len, batch)
    rows = batch * block_rows(cfg, spec, seq_len)
    kv_dim = cfg.kv_heads() * cfg.head_size()
    attention = rows * (4 * D + cfg.n_heads * cfg.head_size() + 2 * kv_dim)
    if spec.has_moe:
        noop = cfg.noop_choices(spec)
        expert_rows = moe_rows(cfg, rows, noop)
        ffn = expert_rows * (2 * D + 4 * cfg.expert_hidden()) + rows * (cfg.moe.num_experts + noop)
        if cfg.moe.shared_experts:  # the shared SwiGLU on every row: its hidden and output
            ffn += rows * (D + 4 * cfg.shared_hidden())
        ffn += rows * hyper_values(cfg)
    else:
        ffn = rows * (2 * D + 4 * cfg.ffn_dim)
    every = 0.0
    if spec.mod_routed:
        hidden = cfg.mod.predictor_hidden if cfg.mod.predictor == Predictor.MLP else 0
        every = batch * seq_len * (D + 1 + hidden)
    return attention + ffn, every


def _recursion_values(cfg: ModelConfig, seq_len: int, batch: int) -> tuple[float, float]:
    """A recursion block's saved values: each recursion's group on its rows (expert
    routing: ``k_r`` per sequence; token routing: all, the masked-dense form; a shared
    cache's later recursions project no keys or values), and per recursion the state of
    every token and its score (and predictor hidden where one decides)."""
    rc = cfg.recursion
    D, N = cfg.d_model, batch * seq_len
    q_dim = cfg.n_heads * cfg.head_size()
    kv_dim = cfg.kv_heads() * cfg.head_size()
    expert = rc.routing == RecursionRouting.EXPERT
    routed, every = 0.0, 0.0
    for r, capacity in enumerate(rc.schedule()):
        rows = batch * (mod_capacity(seq_len, capacity) if expert else seq_len)
        kv = 0 if rc.cache == RecursionCache.SHARED_FIRST and r > 0 else 2 * kv_dim
        routed += rc.group * rows * (4 * D + q_dim + kv + 2 * D + 4 * cfg.ffn_dim)
        hidden = rc.predictor_hidden if expert and rc.predictor == Predictor.MLP else 0
        every += N * (D + 1 + (hidden if capacity < 1.0 else 0))
    return routed, every


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
        rows = moe_rows(m, B * block_rows(m, spec, S), m.noop_choices(spec))
        values += rows * m.d_model  # the exchange sends kept rows only
    return A2A_PER_LAYER * values * ACT_BYTES[precision] * cfg.train.grad_accum
