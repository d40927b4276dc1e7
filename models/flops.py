"""Forward FLOPs per token of a model config, block by block (pure arithmetic).

Conventions (also in docs/design.md, "FLOP accounting"):

- A matmul of ``[m, k] x [k, n]`` costs ``2 m k n`` FLOPs; bias adds, norms, RoPE,
  softmax, activations, gathers and the embedding lookup are not counted (they are
  small next to the matmuls and are what ``torch.utils.flop_counter`` leaves out too).
- Attention projections: Q and the output are ``D x (H * Hd)``; K and V are
  ``D x (G * Hd)`` with ``G = model.n_kv_heads`` key/value heads (grouped-query
  attention); ``H * Hd = D`` unless ``model.head_dim`` says otherwise. The q/k norms
  (``model.qk_norm``) are norms: not counted.
- Attention scores are counted over every key a query's kernel computes: for a block
  that runs on ``M`` positions of a sequence, ``QK^T`` and ``AV`` cost
  ``2 * 2 M^2 H Hd`` per sequence. Causal masking is *not* halved (the usual MFU
  convention, and what the fused kernels compute).
- A MoD-routed block (top-k routing, as in training) runs on ``M = ceil(capacity * S)``
  positions of each sequence; its router and causal predictor run on all ``S``.
- A MoE layer's router runs on every token reaching it (fp32 ``D x E`` matmul, the
  no-op columns of integrated MoDE included); with ``moe.router_input: block`` it
  scores all ``S`` positions of a MoD-routed block, before the MoD choice. The experts
  compute kept rows only, at every ``ep_size`` (``models/dispatch.py``: no capacity
  padding): ``min(T * k', E * C)`` in capacity mode, the real assignments under
  balanced routing capped by the buckets, with
  ``C = max(min_capacity, ceil(capacity_factor * T * k / E))`` and ``T`` the tokens of
  one micro batch reaching the layer; ``T * k'`` dropless. ``k' = k * E / (E + noop)``:
  assignments to no-op experts cost nothing (their share under balanced routing).
  Routing is not balanced in general: drops below the cap are not subtracted (an upper
  bound by the drop fraction), and the share of assignments a router really sends to
  no-op experts is its own, not the balanced one. Shared experts
  (``moe.shared_experts``) run on every token reaching the layer: a SwiGLU of width
  ``shared_experts * Fe`` per token, counted with the experts in ``ffn``. Hyper-experts
  (``moe.hyper``) cost every token reaching the layer its condition (``2 E C``), the
  shared hypernetwork's input layer (``2 C H``) and the generated adapter (``2 D H r``
  down, ``2 H r`` for the contraction over H, ``2 H r D`` up), also in ``ffn``.
- Early exit (training, static shapes): every exit runs the shared head on every
  token, ``2 D V`` per exit (the final norm is not counted).
- A ponder block (training, static shapes) runs its block ``N = ponder.max_steps`` times
  and its halting head (``2 D``) after the first ``N - 1``; the N step states continue
  as N copies of the batch, so every later block and the head cost ``N x``.
- A recursion block (training, static shapes) runs its group once per recursion: under
  expert routing recursion r on ``k_r = ceil(capacity_r * S)`` positions of a sequence,
  its router column on all ``S`` and, where a decision is taken, the predictor MLP on all
  ``S``; under token routing every recursion on all ``S`` rows (the masked-dense form)
  and the depth router (``2 D R``) once. With ``cache: shared_first`` a later recursion
  projects queries and outputs only and its scores run over recursion 1's ``k_1`` keys.
- :func:`expected_flops`: the forward FLOPs per token when each token uses only the
  blocks of a measured depth distribution (the decode rules): an exited token runs the
  blocks up to its exit, the K/V projection of each later block (CALM state
  propagation, ``2 D x 2 G Hd``) and the head of every exit it reached; a halted token
  runs the ponder block's steps it took; a token that ran d recursions runs d passes of
  the group and the routing decisions it reached. Attention scores stay at the full-sequence
  convention above (an approximation: a skipped step also shortens later caches).
- Per-token numbers are averages over the ``batch * S`` tokens of a micro batch.
- Training FLOPs are ``3 x`` forward (backward ~ 2 x forward), the standard estimate.

Shape legend: B micro batch, S sequence length, M positions a block runs on,
D model width, F FFN hidden width, E experts (router columns), V vocabulary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from turnout.config.choices import Predictor, RecursionCache, RecursionRouting, RouterInput
from turnout.config.hyper import HyperConfig
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
    """The dense SwiGLU, or the experts' kept rows."""
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
    """The output projection ``2 D V`` (times the steps of a ponder block before it)."""
    seq_len: int
    batch: int
    exits: float = 0.0
    """The early exits' head projections, ``2 D V`` each."""

    @property
    def per_token(self) -> float:
        """Forward FLOPs per token."""
        return self.head + self.exits + sum(b.total for b in self.blocks)

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
    q_dim = cfg.n_heads * cfg.head_size()
    kv_dim = cfg.kv_heads() * cfg.head_size()  # grouped-query attention: G < H K/V heads
    projections = 2 * D * (q_dim + 2 * kv_dim) + 2 * q_dim * D  # fused q/k/v, the output
    scores = 2 * 2 * rows * rows * q_dim  # QK^T and AV over all heads
    return rows * projections + scores


def moe_rows(cfg: ModelConfig, tokens: int, noop: int) -> float:
    """Expert rows computed for ``tokens`` tokens reaching a MoE layer: the kept rows under
    balanced routing, ``min(T k', E C)`` (dropless ``T k'``; see the module docstring)."""
    moe = cfg.moe
    E, k = moe.num_experts, moe.top_k
    real = tokens * k * E / (E + noop)
    capacity = expert_capacity(tokens, E, k, moe.capacity_factor, moe.min_capacity)
    if capacity is None:
        return real
    return min(real, float(E * capacity))


def hyper_flops(cfg: ModelConfig) -> float:
    """Forward FLOPs per token of a MoE layer's hyper-expert adapter (0 when off)."""
    h = cfg.moe.hyper
    if not h.enabled:
        return 0.0
    D, E, C, H, r = cfg.d_model, cfg.moe.num_experts, h.embed_dim, h.hidden, h.rank
    return 2 * E * C + 2 * C * H + 2 * D * H * r + 2 * H * r + 2 * H * r * D


def block_rows(cfg: ModelConfig, kind: BlockKind, seq_len: int) -> int:
    """Positions of a sequence a block of ``kind`` runs on (top-k MoD routing)."""
    return mod_capacity(seq_len, cfg.mod.capacity) if kind.mod_routed else seq_len


def _attention_over_first(cfg: ModelConfig, rows: int, keys: int) -> float:
    """A recursion over the first recursion's keys: the query and output projections of
    ``rows`` positions and their scores over ``keys`` keys (no K/V projection)."""
    q_dim = cfg.n_heads * cfg.head_size()
    return rows * 2 * 2 * cfg.d_model * q_dim + 2 * 2 * rows * keys * q_dim


def recursion_steps(cfg: ModelConfig, seq_len: int) -> list[tuple[float, float, float]]:
    """Per-sequence ``(attention, ffn, routing)`` FLOPs of each recursion of a recursion
    block in training (expert routing: ``k_r`` compacted rows; token routing: the
    masked-dense form, every row), its whole group included."""
    rc = cfg.recursion
    D, S, g = cfg.d_model, seq_len, rc.group
    expert = rc.routing == RecursionRouting.EXPERT
    caps = rc.schedule()
    rows = [mod_capacity(S, c) if expert else S for c in caps]
    out: list[tuple[float, float, float]] = []
    for r, m in enumerate(rows):
        if rc.cache == RecursionCache.SHARED_FIRST and r > 0:
            attention = g * _attention_over_first(cfg, m, rows[0])
        else:
            attention = g * _attention(cfg, S, m)
        ffn = g * m * SWIGLU_MATMULS * 2 * D * cfg.ffn_dim
        routing = 0.0
        if expert:
            routing += S * 2 * D  # router column r on every position
            if caps[r] < 1.0 and rc.predictor == Predictor.MLP:
                h = rc.predictor_hidden
                routing += S * (2 * D * h + 2 * h)
        elif r == 0:
            routing += S * 2 * D * rc.max_recursions  # the depth router at the entry
        out.append((attention, ffn, routing))
    return out


def recursion_token_flops(cfg: ModelConfig, seq_len: int, recursions: int) -> float:
    """Forward FLOPs of one token that runs ``recursions`` recursions under the decode
    rule: each recursion's group at the full-sequence convention, and the decisions it
    reached (expert routing: the router column, and the predictor where one decides, of
    every recursion up to the one that stopped it; token routing: the entry router)."""
    rc = cfg.recursion
    D, S, g = cfg.d_model, seq_len, rc.group
    ffn = SWIGLU_MATMULS * 2 * D * cfg.ffn_dim
    cost = 0.0
    for r in range(recursions):
        if rc.cache == RecursionCache.SHARED_FIRST and r > 0:
            cost += g * (_attention_over_first(cfg, S, S) / S + ffn)
        else:
            cost += g * (_attention(cfg, S, S) / S + ffn)
    if rc.routing != RecursionRouting.EXPERT:
        return cost + 2 * D * rc.max_recursions
    caps = rc.schedule()
    for r in range(min(recursions + 1, rc.max_recursions)):
        cost += 2 * D
        if caps[r] < 1.0 and rc.predictor == Predictor.MLP:
            cost += 2 * D * rc.predictor_hidden + 2 * rc.predictor_hidden
    return cost


def block_flops(cfg: ModelConfig, kind: str, seq_len: int, batch: int = 1) -> BlockFlops:
    """Forward FLOPs per token of one block of ``kind`` (top-k MoD routing)."""
    D = cfg.d_model
    spec = BLOCK_KINDS[kind]
    if spec.recursion:
        parts = recursion_steps(cfg, seq_len)
        return BlockFlops(
            kind=kind,
            attention=sum(p[0] for p in parts) / seq_len,
            ffn=sum(p[1] for p in parts) / seq_len,
            routing=sum(p[2] for p in parts) / seq_len,
        )
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
        per_seq_ffn += rows * SWIGLU_MATMULS * 2 * D * cfg.shared_hidden()
        per_seq_ffn += rows * hyper_flops(cfg)
    else:
        per_seq_ffn = rows * SWIGLU_MATMULS * 2 * D * cfg.ffn_dim
    steps = cfg.ponder.max_steps if spec.ponder else 1
    if spec.ponder:
        per_seq_routing += seq_len * (steps - 1) * 2 * D  # the halting head
    return BlockFlops(
        kind=kind,
        attention=steps * _attention(cfg, seq_len, rows) / seq_len,
        ffn=steps * per_seq_ffn / seq_len,
        routing=per_seq_routing / seq_len,
    )


def _times(b: BlockFlops, n: float) -> BlockFlops:
    return dataclasses.replace(b, attention=n * b.attention, ffn=n * b.ffn, routing=n * b.routing)


def forward_flops(cfg: ModelConfig, seq_len: int | None = None, batch: int = 1) -> FlopCount:
    """Forward FLOPs per token of ``cfg`` on micro batches of ``batch`` x ``seq_len``.

    ``seq_len`` defaults to ``cfg.max_seq_len``; ``batch`` matters only through the MoE
    capacity (its rounding and ``min_capacity``), the same at every ``ep_size``.
    """
    S = cfg.max_seq_len if seq_len is None else seq_len
    if S < 1 or batch < 1:
        raise ValueError(f"seq_len and batch must be >= 1, got {S} and {batch}")
    blocks = []
    copies = 1  # after a ponder block, its N step states run on as N copies of the batch
    for spec in cfg.blocks():
        block = block_flops(cfg, spec.name, S, batch * copies)
        blocks.append(_times(block, copies))
        if spec.ponder:
            copies = cfg.ponder.max_steps
    head = 2 * cfg.d_model * cfg.vocab_size
    return FlopCount(
        blocks=tuple(blocks),
        head=copies * head,
        seq_len=S,
        batch=batch,
        exits=len(cfg.exit.layers) * head,
    )


def expected_flops(
    cfg: ModelConfig, depth: dict[int, float], seq_len: int | None = None, batch: int = 1
) -> float:
    """Forward FLOPs per token when tokens use ``depth`` blocks (see the module docstring).

    ``depth``: blocks used -> share (or count) of tokens, as in ``LMOutput.depth`` and
    ``DecodeState.depth`` (exit models: the exit depth; ponder models: ``n_layers - 1``
    plus the steps taken). A model without exits or ponder blocks ignores it.
    """
    S = cfg.max_seq_len if seq_len is None else seq_len
    D, L = cfg.d_model, cfg.n_layers
    head = 2 * D * cfg.vocab_size
    single = [block_flops(cfg, spec.name, S, batch) for spec in cfg.blocks()]
    total = sum(depth.values())
    if not total or cfg.depth_kind() is None:
        return head + sum(b.total for b in single)
    kv_dim = cfg.kv_heads() * cfg.head_size()
    propagate = 2 * D * 2 * kv_dim  # K and V projections of an exited token
    out = 0.0
    for used, share in depth.items():
        if cfg.uses_exit():
            run = sum(b.total for b in single[:used]) + (L - used) * propagate
            heads = sum(1 for d in cfg.exit.layers if d <= used) + (used == L)
            cost = run + heads * head
        elif cfg.uses_recursion():
            recursions = (used - (L - 1)) // cfg.recursion.group
            cost = head
            for spec, b in zip(cfg.blocks(), single, strict=True):
                if spec.recursion:
                    cost += recursion_token_flops(cfg, S, recursions)
                else:
                    cost += b.total
        else:
            steps = used - (L - 1)
            cost = head
            for spec, b in zip(cfg.blocks(), single, strict=True):
                if spec.ponder:  # block_flops counted all N steps; take ``steps`` of them
                    n = cfg.ponder.max_steps
                    per_step = (b.attention + b.ffn) / n
                    cost += steps * per_step + min(steps, n - 1) * 2 * D
                else:
                    cost += b.total
        out += share * cost
    return out / total


def dense_counterpart(cfg: ModelConfig) -> ModelConfig:
    """The dense model of equal shape: every block a dense block of width ``ffn_dim``; a
    recursion block's group counts its blocks once (the dense model of equal parameters)."""
    n_layers = cfg.n_layers + (cfg.recursion.group - 1 if cfg.uses_recursion() else 0)
    moe = dataclasses.replace(cfg.moe, hyper=HyperConfig())  # no MoE layer, no hypernetwork
    return dataclasses.replace(cfg, layer_pattern=["dense"], n_layers=n_layers, moe=moe)
