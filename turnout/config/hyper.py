"""Hyper-experts (``model.moe.hyper``): the config section and its checks.

A MoE layer with hyper-experts adds, to its routed output, a rank-r adapter whose
weights one hypernetwork (shared by every MoE layer) generates per token from the
embeddings of the experts the token did not select. ``validate_hyper`` raises
``ConfigError(key, message)`` naming the dotted key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from turnout.errors import ConfigError

if TYPE_CHECKING:
    from turnout.config.model import ModelConfig


@dataclass
class HyperConfig:
    enabled: bool = False
    """Add the generated adapter to every MoE layer (HyperMoE); off by default."""
    rank: int = 4
    """r: rank of the generated adapter (down D -> r, up r -> D)."""
    embed_dim: int = 16
    """Width of each expert's embedding (per MoE layer), the hypernetwork's input."""
    hidden: int = 16
    """H: hidden width of the hypernetwork; the adapter's matrices are linear in its
    H features, so the adapter costs about 4 D H r FLOPs per token."""


def validate_hyper(cfg: ModelConfig, prefix: str = "model") -> None:
    """Ranges, and the model shapes hyper-experts need (checked only when enabled)."""
    h = cfg.moe.hyper
    key = f"{prefix}.moe.hyper"
    for name in ("rank", "embed_dim", "hidden"):
        value = getattr(h, name)
        if value < 1:
            raise ConfigError(f"{key}.{name}", f"must be >= 1, got {value}")
    if not h.enabled:
        return
    if not cfg.uses_moe():
        raise ConfigError(f"{key}.enabled", "the layer pattern has no MoE block to adapt")
    if cfg.moe.top_k >= cfg.moe.num_experts:
        raise ConfigError(
            f"{key}.enabled",
            f"top_k={cfg.moe.top_k} selects every one of num_experts={cfg.moe.num_experts} "
            "experts: no unselected expert is left to condition the adapter on",
        )
    if any(k.noop_experts for k in cfg.blocks()):
        raise ConfigError(
            f"{key}.enabled",
            "does not combine with 'imode' blocks: a token that picks a no-op expert "
            "would still compute the adapter",
        )
