"""Model configuration: structured (omegaconf) dataclasses for the LM, MoE and MoD.

Every field has a docstring-style comment; ``validate_model`` checks ranges and
cross-field rules and raises ``ConfigError(key, message)`` naming the dotted key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from turnout.config.choices import (
    Balance,
    Predictor,
    RecursionCache,
    RecursionRouting,
    RouterGate,
    RouterInput,
)
from turnout.config.depth import positive as _positive
from turnout.config.depth import validate_depth
from turnout.errors import ConfigError

#: The FFN of a block: a dense SwiGLU or a Mixture-of-Experts layer.
FFN_DENSE = "dense"
FFN_MOE = "moe"


@dataclass(frozen=True)
class BlockKind:
    """What a layer-pattern entry builds; the one place a kind's meaning is written."""

    name: str
    ffn: str
    """FFN_DENSE or FFN_MOE."""
    mod_routed: bool
    """Wrapped in a Mixture-of-Depths router (only the chosen positions run the block)."""
    noop_experts: bool
    """The MoE router also offers model.moe.num_noop_experts no-op choices."""
    meaning: str
    ponder: bool = False
    """One weight-tied block applied up to model.ponder.max_steps times (PonderNet)."""
    recursion: bool = False
    """A group of model.recursion.group blocks whose weights every recursion reuses, run
    up to model.recursion.max_recursions times per token (Mixture-of-Recursions)."""

    @property
    def has_moe(self) -> bool:
        return self.ffn == FFN_MOE


#: Block kinds a layer pattern may name, by name.
BLOCK_KINDS: dict[str, BlockKind] = {
    k.name: k
    for k in (
        BlockKind("dense", FFN_DENSE, False, False, "attention + SwiGLU FFN"),
        BlockKind("moe", FFN_MOE, False, False, "attention + MoE FFN"),
        BlockKind("mod", FFN_DENSE, True, False, "MoD-routed dense block"),
        BlockKind("mode", FFN_MOE, True, False, "MoD-routed block with an MoE FFN (staged MoDE)"),
        BlockKind("imode", FFN_MOE, False, True, "attention + MoE whose router adds no-op experts"),
        BlockKind(
            "ponder",
            FFN_DENSE,
            False,
            False,
            "dense block applied up to model.ponder.max_steps times, halting per token",
            ponder=True,
        ),
        BlockKind(
            "recursion",
            FFN_DENSE,
            False,
            False,
            "model.recursion.group dense blocks shared across up to "
            "model.recursion.max_recursions recursions, a router choosing each token's depth",
            recursion=True,
        ),
    )
}


@dataclass
class MoEConfig:
    num_experts: int = 8
    """Number of routed experts E (global, across all expert-parallel ranks)."""
    top_k: int = 2
    """Experts chosen per token (token-choice top-k)."""
    capacity_factor: float | None = 1.25
    """C = max(min_capacity, ceil(capacity_factor * T * k / E)); null means dropless."""
    min_capacity: int = 4
    """Lower bound on the per-expert capacity C."""
    normalize_gates: bool | None = None
    """Renormalise the top-k gates to sum 1; null picks true for k>1, false for k=1."""
    expert_ffn_dim: int = 0
    """Hidden size of each SwiGLU expert; 0 means model.ffn_dim."""
    aux_loss_coef: float = 0.01
    """Weight of the load-balance loss E * sum_e f_e * P_e."""
    z_loss_coef: float = 0.001
    """Weight of the router z-loss mean(logsumexp(logits)^2)."""
    shared_experts: int = 0
    """Always-on experts beside the routed ones (DeepSeek-MoE / Qwen2-MoE style): every
    token reaching the layer also runs one SwiGLU of hidden shared_experts *
    expert_ffn_dim, added to the routed output ungated. 0: none."""
    num_noop_experts: int = 0
    """Integrated MoDE ('imode' blocks): extra router choices that compute nothing."""
    router_input: str = RouterInput.FFN.value
    """What the router of a 'mode' block reads: 'ffn' (the FFN input, as in every MoE
    block) or 'block' (the block input, next to the MoD router: the MoD choice and the
    chosen tokens' expert plan then come from one fused op). 'block' needs every MoE
    block of the pattern to be 'mode'."""
    balance: str = Balance.AUX.value
    """'aux' (the load-balance loss), 'bias' (a per-expert bias on the router logits for
    the top-k choice only, moved by bias_rate each optimizer step toward equal load; the
    loss then weighs nothing whatever aux_loss_coef says) or 'both'."""
    bias_rate: float = 1e-3
    """Per-step size of the expert-bias update (router-logit units): each expert's bias
    moves by +-bias_rate toward the mean load of its layer (balance 'bias' or 'both')."""

    def uses_bias(self) -> bool:
        """Whether the routers carry the aux-loss-free selection bias."""
        return self.balance in (Balance.BIAS, Balance.BOTH)

    def uses_aux_loss(self) -> bool:
        """Whether the load-balance loss enters the training loss (at aux_loss_coef)."""
        return self.balance in (Balance.AUX, Balance.BOTH)

    def gates_normalized(self) -> bool:
        """The effective gate normalisation (the null default resolved from top_k)."""
        if self.normalize_gates is None:
            return self.top_k > 1
        return bool(self.normalize_gates)


@dataclass
class MoDConfig:
    capacity: float = 0.125
    """Fraction of each sequence a routed block processes: k = ceil(capacity * S)."""
    predictor: str = Predictor.MLP.value
    """Causal decision for sampling: 'mlp' (small MLP on the stop-gradient input) or
    'router' (auxiliary BCE on the router score itself)."""
    predictor_hidden: int = 64
    """Hidden width of the causal predictor MLP."""
    predictor_loss_coef: float = 0.1
    """Weight of the predictor's BCE loss (membership in the sequence's top-k)."""
    router_gate: str = RouterGate.SIGMOID.value
    """g(r) scaling the chosen tokens' residual increment: 'sigmoid' or 'identity'."""


@dataclass
class ExitConfig:
    layers: list[int] = field(default_factory=list)
    """Early-exit points: depths d (blocks run, 1 <= d < n_layers, increasing) after which
    the shared final norm and LM head also predict; empty: no early exit."""
    loss_weights: list[float] = field(default_factory=list)
    """Weight of each exit's cross-entropy (one per exit point); empty: 1.0 each."""
    loss_coef: float = 1.0
    """Weight of the summed exit loss sum_i w_i * ce_i in the training loss."""
    layer_dropout: float = 0.0
    """LayerSkip-style layer dropout in training: block i of a sequence is skipped with
    probability layer_dropout * i / (n_layers - 1) (0 at the first block)."""
    threshold: float = 0.9
    """Decode: a token exits at the first exit whose max softmax probability is above
    this (1.0 never exits; `turnout generate --exit-threshold` overrides it)."""


@dataclass
class PonderConfig:
    max_steps: int = 4
    """N_max: most applications of a 'ponder' block per token (training unrolls all)."""
    prior: float = 0.25
    """lambda_p of the geometric prior on the halting step (PonderNet)."""
    kl_coef: float = 0.01
    """Weight of KL(halting distribution || truncated geometric prior)."""
    threshold: float = 0.5
    """Decode: a token halts after the first step whose cumulative halting probability
    is above this (1.0 never halts early; `turnout generate --halt-threshold`)."""


@dataclass
class RecursionConfig:
    max_recursions: int = 3
    """R: most times a token runs the 'recursion' block group (training runs the
    recursions its routing gives it, up to R)."""
    group: int = 1
    """Blocks in the shared group; one recursion runs all of them in order."""
    routing: str = RecursionRouting.EXPERT.value
    """'expert' (expert-choice top-k per recursion among the tokens still running, a
    causal predictor deciding at decode time) or 'token' (one router at the group's entry
    gives each token its depth, top-1 of max_recursions)."""
    capacities: list[float] = field(default_factory=list)
    """Expert routing: the fraction of each sequence recursion r runs, k_r =
    ceil(capacity_r * S), non-increasing, one per recursion; empty: (R - r) / R for
    r = 0..R-1 (1, 2/3, 1/3 at R = 3). A recursion of capacity 1 runs every token that
    reached it, with no decision."""
    cache: str = RecursionCache.PER_RECURSION.value
    """'per_recursion' (recursion r attends over, and caches, the tokens that ran it) or
    'shared_first' (later recursions attend over the first recursion's keys and values,
    computing queries only, and cache nothing)."""
    predictor: str = Predictor.MLP.value
    """Expert routing's causal decision per recursion: 'mlp' (a small MLP on the
    stop-gradient state) or 'router' (the router score itself, under the BCE)."""
    predictor_hidden: int = 64
    """Hidden width of each recursion's predictor MLP."""
    predictor_loss_coef: float = 0.1
    """Weight of the predictors' BCE against top-k membership (expert routing)."""
    balance_coef: float = 0.01
    """Token routing: weight of the depth load-balance loss R * sum_d f_d * P_d."""
    router_gate: str = RouterGate.SIGMOID.value
    """g(score) scaling a recursion's increment: 'sigmoid' or 'identity' (expert
    routing); token routing scales by the softmax probability of the chosen depth."""

    def schedule(self) -> list[float]:
        """The capacity of each recursion (expert routing)."""
        R = self.max_recursions
        return list(self.capacities) or [(R - r) / R for r in range(R)]


@dataclass
class ModelConfig:
    vocab_size: int = 256
    """Vocabulary size (256 for the byte-level tokenizer)."""
    d_model: int = 128
    """Residual stream width."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention heads; d_model must be divisible by it."""
    n_kv_heads: int = 0
    """Key/value heads (grouped-query attention); 0 means n_heads. Must divide n_heads."""
    head_dim: int = 0
    """Width of one attention head; 0 means d_model / n_heads (Qwen3 uses wider heads)."""
    qk_norm: bool = False
    """Per-head RMSNorm (weight of head_dim, eps norm_eps) on queries and keys before
    RoPE, as Qwen3 does."""
    ffn_dim: int = 256
    """SwiGLU hidden size of dense FFNs."""
    max_seq_len: int = 256
    """Training sequence length S (and the RoPE table size)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Std of the normal initialisation of linear and embedding weights."""
    tie_embeddings: bool = True
    """Share the input embedding and the output projection."""
    layer_pattern: list[str] = field(default_factory=lambda: ["dense", "mode"])
    """Block kinds, cycled over n_layers; each one of dense, moe, mod, mode, imode, ponder,
    recursion."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture-of-Experts settings (moe, mode, imode blocks)."""
    mod: MoDConfig = field(default_factory=MoDConfig)
    """Mixture-of-Depths settings (mod, mode blocks)."""
    exit: ExitConfig = field(default_factory=ExitConfig)
    """Early exit: exit points sharing the final norm and head, their loss, decode rule."""
    ponder: PonderConfig = field(default_factory=PonderConfig)
    """Adaptive computation ('ponder' blocks): PonderNet halting, loss and decode rule."""
    recursion: RecursionConfig = field(default_factory=RecursionConfig)
    """Mixture-of-Recursions ('recursion' entry): shared group, depth router, KV policy."""

    def block_kinds(self) -> list[str]:
        """The kind of each of the n_layers blocks (the pattern cycled)."""
        return [self.layer_pattern[i % len(self.layer_pattern)] for i in range(self.n_layers)]

    def blocks(self) -> list[BlockKind]:
        """The :class:`BlockKind` of each of the n_layers blocks."""
        return [BLOCK_KINDS[k] for k in self.block_kinds()]

    def kv_heads(self) -> int:
        """The effective number of key/value heads (0 resolved to n_heads)."""
        return self.n_kv_heads or self.n_heads

    def head_size(self) -> int:
        """The effective head width Hd (0 resolved to d_model / n_heads)."""
        return self.head_dim or self.d_model // self.n_heads

    def noop_choices(self, kind: BlockKind) -> int:
        """No-op router columns a block of ``kind`` offers (integrated MoDE), else 0."""
        return self.moe.num_noop_experts if kind.noop_experts else 0

    def expert_hidden(self) -> int:
        return self.moe.expert_ffn_dim or self.ffn_dim

    def shared_hidden(self) -> int:
        """Hidden width of a MoE layer's shared-expert SwiGLU (0: no shared experts)."""
        return self.moe.shared_experts * self.expert_hidden()

    def uses_moe(self) -> bool:
        return any(k.has_moe for k in self.blocks())

    def uses_mod(self) -> bool:
        return any(k.mod_routed for k in self.blocks())

    def uses_exit(self) -> bool:
        return bool(self.exit.layers)

    def uses_ponder(self) -> bool:
        return any(k.ponder for k in self.blocks())

    def uses_recursion(self) -> bool:
        return any(k.recursion for k in self.blocks())

    def depth_kind(self) -> str | None:
        """'exit', 'ponder' or 'recursion' for a model whose depth varies per token."""
        if self.uses_exit():
            return "exit"
        if self.uses_ponder():
            return "ponder"
        return "recursion" if self.uses_recursion() else None

    def depth_steps(self) -> tuple[int, int]:
        """(most steps, blocks per step) of the model's variable-depth block: a ponder
        block's applications (1 block each) or a recursion group's recursions."""
        if self.uses_recursion():
            return self.recursion.max_recursions, self.recursion.group
        return self.ponder.max_steps, 1


def validate_model(cfg: ModelConfig, prefix: str = "model") -> None:
    """Check ranges and cross-field rules; raise ConfigError naming the dotted key."""
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "ffn_dim", "max_seq_len"):
        _positive(f"{prefix}.{name}", getattr(cfg, name))
    _positive(f"{prefix}.rope_theta", cfg.rope_theta)
    _positive(f"{prefix}.norm_eps", cfg.norm_eps)
    _positive(f"{prefix}.init_std", cfg.init_std)
    if cfg.head_dim < 0 or cfg.head_dim % 2:
        raise ConfigError(
            f"{prefix}.head_dim", f"must be 0 (= d_model/n_heads) or even, got {cfg.head_dim}"
        )
    if not cfg.head_dim and cfg.d_model % cfg.n_heads:
        raise ConfigError(
            f"{prefix}.n_heads", f"d_model={cfg.d_model} is not divisible by n_heads={cfg.n_heads}"
        )
    if cfg.head_size() % 2:
        raise ConfigError(f"{prefix}.n_heads", "head dim d_model/n_heads must be even for RoPE")
    if cfg.n_kv_heads < 0 or cfg.n_heads % cfg.kv_heads():
        raise ConfigError(
            f"{prefix}.n_kv_heads",
            f"must be 0 (= n_heads) or divide n_heads={cfg.n_heads}, got {cfg.n_kv_heads}",
        )
    if not cfg.layer_pattern:
        raise ConfigError(f"{prefix}.layer_pattern", "must name at least one block kind")
    for i, kind in enumerate(cfg.layer_pattern):
        if kind not in BLOCK_KINDS:
            raise ConfigError(
                f"{prefix}.layer_pattern[{i}]",
                f"unknown block kind {kind!r}; expected one of {', '.join(BLOCK_KINDS)}",
            )
    kinds = cfg.blocks()
    moe, mod = cfg.moe, cfg.mod
    m = f"{prefix}.moe"
    _positive(f"{m}.num_experts", moe.num_experts)
    _positive(f"{m}.top_k", moe.top_k)
    # moe/mode routers offer num_experts choices; imode routers add the no-op experts.
    choices = [
        moe.num_experts + (moe.num_noop_experts if k.noop_experts else 0)
        for k in kinds
        if k.has_moe
    ]
    n_choices = min(choices, default=moe.num_experts)
    if moe.top_k > n_choices:
        raise ConfigError(
            f"{m}.top_k",
            f"top_k={moe.top_k} exceeds the router choices ({n_choices}; "
            f"num_experts={moe.num_experts}, num_noop_experts={moe.num_noop_experts})",
        )
    if moe.capacity_factor is not None:
        cf = moe.capacity_factor
        if not math.isfinite(cf) or cf <= 0:
            raise ConfigError(f"{m}.capacity_factor", f"must be > 0 or null (dropless), got {cf}")
    if moe.min_capacity < 0:
        raise ConfigError(f"{m}.min_capacity", f"must be >= 0, got {moe.min_capacity}")
    if moe.expert_ffn_dim < 0:
        raise ConfigError(f"{m}.expert_ffn_dim", f"must be >= 0, got {moe.expert_ffn_dim}")
    if moe.aux_loss_coef < 0 or moe.z_loss_coef < 0:
        key = "aux_loss_coef" if moe.aux_loss_coef < 0 else "z_loss_coef"
        raise ConfigError(f"{m}.{key}", "must be >= 0")
    if moe.shared_experts < 0:
        raise ConfigError(f"{m}.shared_experts", f"must be >= 0, got {moe.shared_experts}")
    if moe.num_noop_experts < 0:
        raise ConfigError(f"{m}.num_noop_experts", f"must be >= 0, got {moe.num_noop_experts}")
    if any(k.noop_experts for k in kinds) and moe.num_noop_experts == 0:
        raise ConfigError(
            f"{m}.num_noop_experts", "an 'imode' block needs at least one no-op expert"
        )
    if moe.router_input not in RouterInput.values():
        raise ConfigError(
            f"{m}.router_input", f"must be {RouterInput.spelled()}, got {moe.router_input!r}"
        )
    if moe.balance not in Balance.values():
        raise ConfigError(f"{m}.balance", f"must be {Balance.spelled()}, got {moe.balance!r}")
    if not (0 < moe.bias_rate < math.inf):  # also rejects nan
        raise ConfigError(f"{m}.bias_rate", f"must be > 0, got {moe.bias_rate}")
    if moe.router_input == RouterInput.BLOCK:
        others = sorted({k.name for k in kinds if k.has_moe and not k.mod_routed})
        if others or not any(k.has_moe and k.mod_routed for k in kinds):
            found = f"the pattern has {', '.join(others)}" if others else "no 'mode' block"
            raise ConfigError(f"{m}.router_input", f"'block' is for 'mode' blocks only; {found}")
    d = f"{prefix}.mod"
    if not (0.0 < mod.capacity <= 1.0):
        raise ConfigError(f"{d}.capacity", f"must be in (0, 1], got {mod.capacity}")
    if mod.predictor not in Predictor.values():
        raise ConfigError(f"{d}.predictor", f"must be {Predictor.spelled()}, got {mod.predictor!r}")
    if mod.router_gate not in RouterGate.values():
        raise ConfigError(
            f"{d}.router_gate", f"must be {RouterGate.spelled()}, got {mod.router_gate!r}"
        )
    _positive(f"{d}.predictor_hidden", mod.predictor_hidden)
    if mod.predictor_loss_coef < 0:
        raise ConfigError(f"{d}.predictor_loss_coef", "must be >= 0")
    validate_depth(cfg, prefix)
