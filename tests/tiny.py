"""The tiny MoDE language model the distributed tests share (one dense + one mode block)."""

from __future__ import annotations

from turnout.config.model import MoDConfig, ModelConfig, MoEConfig


def tiny_mode_cfg(
    capacity_factor: float | None, mod_capacity: float, seq_len: int = 8, vocab: int = 32
) -> ModelConfig:
    """4 experts top-2 (``capacity_factor=None`` is dropless), d_model 16, 2 layers."""
    return ModelConfig(
        vocab_size=vocab,
        d_model=16,
        n_layers=2,
        n_heads=2,
        ffn_dim=32,
        max_seq_len=seq_len,
        layer_pattern=["dense", "mode"],
        moe=MoEConfig(num_experts=4, top_k=2, capacity_factor=capacity_factor, min_capacity=1),
        mod=MoDConfig(capacity=mod_capacity),
    )
