"""Forward FLOPs per token of a model config, block by block (pure arithmetic).

Conventions (also in docs/design.md, "FLOP accounting"):

- A matmul of ``[m, k] x [k, n]`` costs ``2 m k n`` FLOPs; bias adds, norms, RoPE,
  softmax, activations, gathers and the embedding lookup are not counted (they are
  small next to the matmuls and are what ``torch.utils.flop_counter`` leaves out too).
- Attention projections: Q and the output are ``D x D``; K and V are ``D x (G * Hd)``
  with ``G = model.n_kv_heads`` key/value heads (grouped-query attention).
- Attention scores are counted over every key a query's kernel computes: for a block
  that runs on ``M`` positions of a sequence, ``QK^T`` and ``AV`` cost ``2 * 2 M^2 D``
  per sequence. Causal masking is *not* halved (the usual MFU convention, and what the
  fused kernels compute).
- A MoD-routed block (top-k routing, as in training) runs on ``M = ceil(capacity * S)``
  positions of each sequence; its router and causal predictor run on all ``S``.
- A MoE layer's router runs on every token reaching it (fp32 ``D x E`` matmul, the
  no-op columns of integrated MoDE included); with ``moe.router_input: block`` it
  scores all ``S`` positions of a MoD-routed block, before the MoD choice. In
  capacity mode the experts compute every row of their ``[E, C, D]`` buckets, padding included, with
  ``C = max(min_capacity, ceil(capacity_factor * T * k / E))`` and ``T`` the tokens of
  one micro batch reaching the layer; dropless mode counts the ``k`` real rows per
  token (assignments to no-op experts cost nothing: the share ``E / (E + noop)`` of
  the ``k`` choices under balanced routing).
- Per-token numbers are averages over the ``batch * S`` tokens of a micro batch.
- Training FLOPs are ``3 x`` forward (backward ~ 2 x forward), the standard estimate.

Shape legend: B micro batch, S sequence length, M positions a block runs on,
D model width, F FFN hidden width, E experts (router columns), V vocabulary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from turnout.config.choices import Predictor, RouterInput
from turnout.config.model import BLOCK_KINDS, BlockKind, ModelConfig
from turnout.models.routing import expert_capacity, mod_capacity

#: Backward costs about twice the forward, so one training step is ~3x forward FLOPs.
TRAIN_FLOPS_PER_FORWARD = 3.0
#: SwiGLU runs three matmuls of width F (gate, up, down).
SWIGLU_MATMULS = 3


@dataclass(frozen=True)
class BlockFlops:
    """Forward FLOPs per token (averaged over the micro batch) of one block."""

    kind: str
    attention: float
    """Q/K/V and output projections plus the attention scores."""
    ffn: float
    """The dense SwiGLU, or the experts' rows (capacity padding included)."""
    routing: float
    """MoE router, MoD router and causal predictor."""

    @property
    def total(self) -> float:
        return self.attention + self.ffn + self.routing


@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs per token of a whole model, with the per-block breakdown."""

    blocks: tuple[BlockFlops, ...]
    head: float
    """The output projection ``2 D V``."""
    seq_len: int
    batch: int

    @property
    def per_token(self) -> float:
        """Forward FLOPs per token."""
        return self.head + sum(b.total for b in self.blocks)

    @property
    def train_per_token(self) -> float:
        """Training FLOPs per token (forward + backward)."""
        return TRAIN_FLOPS_PER_FORWARD * self.per_token

    def fraction_of(self, other: FlopCount) -> float:
        """This model's forward FLOPs per token over ``other``'s."""
        return self.per_token / other.per_token


def _attention(cfg: ModelConfig, seq_len: int, rows: int) -> float:
    """Attention FLOPs of one sequence when the block runs on ``rows`` of its positions."""
    D = cfg.d_model
    kv_dim = cfg.kv_heads() * (D // cfg.n_heads)  # grouped-query attention: G < H K/V heads
    projections = 2 * D * (D + 2 * kv_dim) + 2 * D * D  # fused q/k/v, then the output
    scores = 2 * 2 * rows * rows * D  # QK^T and AV over all heads
    return rows * projections + scores


def moe_rows(cfg: ModelConfig, tokens: int, noop: int) -> float:
    """Expert rows computed for ``tokens`` tokens reaching a MoE layer."""
    moe = cfg.moe
    E, k = moe.num_experts, moe.top_k
    capacity = expert_capacity(tokens, E, k, moe.capacity_factor, moe.min_capacity)
    if capacity is None:
        return tokens * k * E / (E + noop)
    return float(E * capacity)


def block_rows(cfg: ModelConfig, kind: BlockKind, seq_len: int) -> int:
    """Positions of a sequence a block of ``kind`` runs on (top-k MoD routing)."""
    return mod_capacity(seq_len, cfg.mod.capacity) if kind.mod_routed else seq_len


def block_flops(cfg: ModelConfig, kind: str, seq_len: int, batch: int = 1) -> BlockFlops:
    """Forward FLOPs per token of one block of ``kind`` (top-k MoD routing)."""
    D = cfg.d_model
    spec = BLOCK_KINDS[kind]
    rows = block_rows(cfg, spec, seq_len)
    per_seq_routing = 0.0
    if spec.mod_routed:
        per_seq_routing += seq_len * 2 * D  # MoD router: one score per position
        if cfg.mod.predictor == Predictor.MLP:
            h = cfg.mod.predictor_hidden
            per_seq_routing += seq_len * (2 * D * h + 2 * h)
    if spec.has_moe:
        noop = cfg.noop_choices(spec)
        # A router reading the block input scores every position, not only the chosen.
        block_input = spec.mod_routed and cfg.moe.router_input == RouterInput.BLOCK
        router_rows = seq_len if block_input else rows
        per_seq_routing += router_rows * 2 * D * (cfg.moe.num_experts + noop)
        expert_rows = moe_rows(cfg, batch * rows, noop) / batch
        per_seq_ffn = expert_rows * SWIGLU_MATMULS * 2 * D * cfg.expert_hidden()
    else:
        per_seq_ffn = rows * SWIGLU_MATMULS * 2 * D * cfg.ffn_dim
    return BlockFlops(
        kind=kind,
        attention=_attention(cfg, seq_len, rows) / seq_len,
        ffn=per_seq_ffn / seq_len,
        routing=per_seq_routing / seq_len,
    )


def forward_flops(cfg: ModelConfig, seq_len: int | None = None, batch: int = 1) -> FlopCount:
    """Forward FLOPs per token of ``cfg`` on micro batches of ``batch`` x ``seq_len``.

    ``seq_len`` defaults to ``cfg.max_seq_len``; ``batch`` matters only through the MoE
    capacity (its rounding and ``min_capacity``).
    """
    S = cfg.max_seq_len if seq_len is None else seq_len
    if S < 1 or batch < 1:
        raise ValueError(f"seq_len and batch must be >= 1, got {S} and {batch}")
    blocks = tuple(block_flops(cfg, kind, S, batch) for kind in cfg.block_kinds())
    return FlopCount(blocks=blocks, head=2 * cfg.d_model * cfg.vocab_size, seq_len=S, batch=batch)


def dense_counterpart(cfg: ModelConfig) -> ModelConfig:
    """The dense model of equal shape: every block a dense block of width ``ffn_dim``."""
    return dataclasses.replace(cfg, layer_pattern=["dense"])
