"""Model configuration: structured (omegaconf) dataclasses for the LM, MoE and MoD.

Every field has a docstring-style comment; ``validate_model`` checks ranges and
cross-field rules and raises ``ConfigError(key, message)`` naming the dotted key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from turnout.config.choices import Balance, Predictor, RouterGate, RouterInput
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
    """Block kinds, cycled over n_layers; each one of dense, moe, mod, mode, imode."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture-of-Experts settings (moe, mode, imode blocks)."""
    mod: MoDConfig = field(default_factory=MoDConfig)
    """Mixture-of-Depths settings (mod, mode blocks)."""

    def block_kinds(self) -> list[str]:
        """The kind of each of the n_layers blocks (the pattern cycled)."""
        return [self.layer_pattern[i % len(self.layer_pattern)] for i in range(self.n_layers)]

    def blocks(self) -> list[BlockKind]:
        """The :class:`BlockKind` of each of the n_layers blocks."""
        return [BLOCK_KINDS[k] for k in self.block_kinds()]

    def kv_heads(self) -> int:
        """The effective number of key/value heads (0 resolved to n_heads)."""
        return self.n_kv_heads or self.n_heads

    def noop_choices(self, kind: BlockKind) -> int:
        """No-op router columns a block of ``kind`` offers (integrated MoDE), else 0."""
        return self.moe.num_noop_experts if kind.noop_experts else 0

    def expert_hidden(self) -> int:
        return self.moe.expert_ffn_dim or self.ffn_dim

    def uses_moe(self) -> bool:
        return any(k.has_moe for k in self.blocks())

    def uses_mod(self) -> bool:
        return any(k.mod_routed for k in self.blocks())


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(key, f"must be > 0, got {value}")


def validate_model(cfg: ModelConfig, prefix: str = "model") -> None:
    """Check ranges and cross-field rules; raise ConfigError naming the dotted key."""
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "ffn_dim", "max_seq_len"):
        _positive(f"{prefix}.{name}", getattr(cfg, name))
    _positive(f"{prefix}.rope_theta", cfg.rope_theta)
    _positive(f"{prefix}.norm_eps", cfg.norm_eps)
    _positive(f"{prefix}.init_std", cfg.init_std)
    if cfg.d_model % cfg.n_heads:
        raise ConfigError(
            f"{prefix}.n_heads", f"d_model={cfg.d_model} is not divisible by n_heads={cfg.n_heads}"
        )
    if (cfg.d_model // cfg.n_heads) % 2:
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
