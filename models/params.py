"""Parameter counts of a model config, block by block (pure arithmetic).

Conventions:

- **Total** is every trainable parameter of :class:`~turnout.models.lm.TransformerLM`
  built from the config on one rank (``sum(p.numel())`` over the deduplicated
  parameters): a tied head shares the embedding matrix and is counted once; an untied
  head (``model.tie_embeddings: false``) counts its own ``V x D``.
- **Active** is what one token touches on its way through the model when it is
  processed by every block: the whole embedding matrix and head (the usual convention
  for published "active" counts, e.g. Mixtral's 12.9B, although a lookup reads one
  row), attention and norms, a dense FFN, and ``min(top_k, num_experts)`` experts of a
  MoE layer plus its whole router. MoD routers and causal predictors are active (they
  run on every token); that a MoD block skips most tokens is a saving in FLOPs
  (:mod:`turnout.models.flops`), not in the parameters a processed token uses. For
  integrated MoDE the count is the most a token can take (``top_k`` real experts; a
  no-op choice uses none). A recursion block's group counts once (its weights serve
  every recursion), with its router and predictors. Hyper-experts (``moe.hyper``) add
  an expert-embedding table per MoE layer (with its router) and one shared
  hypernetwork (``hyper``), all active: every token conditions on the embeddings and
  runs the generated adapter.

Shape legend: D model width, F dense FFN hidden, Fe expert hidden, E experts, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

from turnout.config.choices import Predictor, RecursionRouting
from turnout.config.model import BLOCK_KINDS, ModelConfig
from turnout.models.flops import SWIGLU_MATMULS


@dataclass(frozen=True)
class BlockParams:
    """Parameters of one block, by part."""

    kind: str
    attention: int
    """Fused Q/K/V projection and the output projection."""
    norms: int
    """The two RMSNorm weights (and the q/k norms under ``model.qk_norm``)."""
    ffn: int
    """The dense SwiGLU; for a MoE block its shared experts (``moe.shared_experts``,
    which every token uses; the routed experts are in ``experts``)."""
    experts: int
    """All experts of the block's MoE layer (0 for a dense FFN)."""
    per_expert: int
    """One expert's parameters (0 for a dense FFN)."""
    active_experts: int
    """Experts one token uses: ``min(top_k, num_experts)`` (0 for a dense FFN)."""
    routing: int
    """MoE router, MoD router and the MoD causal predictor."""

    @property
    def dense(self) -> int:
        """Parameters outside the expert bank (replicated over expert parallelism)."""
        return self.attention + self.norms + self.ffn + self.routing

    @property
    def total(self) -> int:
        return self.dense + self.experts

    @property
    def active(self) -> int:
        return self.dense + self.active_experts * self.per_expert


@dataclass(frozen=True)
class ParamCount:
    """Parameters of a whole model, with the per-block breakdown."""

    blocks: tuple[BlockParams, ...]
    embedding: int
    """The input embedding ``V x D``."""
    head: int
    """The untied output projection ``V x D`` (0 when tied to the embedding)."""
    final_norm: int
    hyper: int = 0
    """The shared hypernetwork of hyper-experts (0 without), dense and active."""

    @property
    def experts(self) -> int:
        """Parameters in expert banks (what expert parallelism splits over ``ep``)."""
        return sum(b.experts for b in self.blocks)

    @property
    def total(self) -> int:
        outside = self.embedding + self.head + self.final_norm + self.hyper
        return outside + sum(b.total for b in self.blocks)

    @property
    def dense(self) -> int:
        """Parameters every rank holds whatever ``ep`` is (``total - experts``)."""
        return self.total - self.experts

    @property
    def active(self) -> int:
        outside = self.embedding + self.head + self.final_norm + self.hyper
        return outside + sum(b.active for b in self.blocks)


def block_params(cfg: ModelConfig, kind: str) -> BlockParams:
    """Parameters of one block of ``kind``."""
    D = cfg.d_model
    spec = BLOCK_KINDS[kind]
    q_dim = cfg.n_heads * cfg.head_size()
    kv_dim = cfg.kv_heads() * cfg.head_size()
    attention = D * (q_dim + 2 * kv_dim) + q_dim * D
    routing = 0
    if spec.mod_routed:
        routing += D  # the MoD router: one score per token, no bias
        if cfg.mod.predictor == Predictor.MLP:
            h = cfg.mod.predictor_hidden
            routing += D * h + h + h + 1  # Linear(D, h) and Linear(h, 1), with biases
    if spec.ponder:
        routing += D + 1  # the halting head Linear(D, 1) with its bias
    g = 1
    if spec.recursion:  # the group's blocks, counted once whatever the recursions
        rc = cfg.recursion
        g = rc.group
        routing += D * rc.max_recursions  # the router: a column per recursion / depth
        if rc.routing == RecursionRouting.EXPERT and rc.predictor == Predictor.MLP:
            h = rc.predictor_hidden
            decided = sum(1 for c in rc.schedule() if c < 1.0)
            routing += decided * (D * h + h + h + 1)
    ffn = experts = per_expert = active = 0
    if spec.has_moe:
        noop = cfg.noop_choices(spec)
        E = cfg.moe.num_experts
        routing += D * (E + noop)
        if cfg.moe.hyper.enabled:
            routing += E * cfg.moe.hyper.embed_dim  # the expert embeddings
        per_expert = SWIGLU_MATMULS * D * cfg.expert_hidden()
        experts = E * per_expert
        active = min(cfg.moe.top_k, E)
        ffn = SWIGLU_MATMULS * D * cfg.shared_hidden()  # shared experts: every token
    else:
        ffn = SWIGLU_MATMULS * D * cfg.ffn_dim
    return BlockParams(
        kind=kind,
        attention=g * attention,
        norms=g * (2 * D + (2 * cfg.head_size() if cfg.qk_norm else 0)),
        ffn=g * ffn,
        experts=experts,
        per_expert=per_expert,
        active_experts=active,
        routing=routing,
    )


def count_params(cfg: ModelConfig) -> ParamCount:
    """Total and active parameters of the model ``cfg`` builds (see the module docstring)."""
    vd = cfg.vocab_size * cfg.d_model
    return ParamCount(
        blocks=tuple(block_params(cfg, kind) for kind in cfg.block_kinds()),
        embedding=vd,
        head=0 if cfg.tie_embeddings else vd,
        final_norm=cfg.d_model,
        hyper=hyper_params(cfg),
    )


def hyper_params(cfg: ModelConfig) -> int:
    """The shared hypernetwork's parameters (0 without hyper-experts)."""
    h = cfg.moe.hyper
    if not h.enabled:
        return 0
    D, C, H, r = cfg.d_model, h.embed_dim, h.hidden, h.rank
    return C * H + H + 2 * D * H * r
