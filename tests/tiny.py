"""The tiny MoDE language model the distributed tests share (one dense + one mode block), and
a tiny checkpoint folder without training."""

from __future__ import annotations

from pathlib import Path

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


def tiny_checkpoint(root: Path, *overrides: str) -> Path:
    """A step folder ``root/run/step4`` of a seeded random ``tiny`` preset model, in the
    format training saves (weights, meta, config.yaml, tokenizer.json, ``latest``)."""
    import torch

    from turnout.config.load import load_config, to_yaml
    from turnout.files import TOKENIZER_FILE
    from turnout.models.lm import TransformerLM
    from turnout.trainer.checkpointing.files import (
        DENSE_FILE,
        FORMAT,
        META_FILE,
        persistent_buffers,
    )
    from turnout.trainer.data.tokenizer import ByteTokenizer

    cfg = load_config("tiny", ["parallel.ep_size=1", *overrides])
    torch.manual_seed(0)
    model = TransformerLM(cfg.model)
    folder = root / "run" / "step4"
    folder.mkdir(parents=True)
    meta = {"format": FORMAT, "step": 4, "expert_files": [], "weight_dtype": "float32"}
    torch.save(meta, folder / META_FILE)
    buffers = persistent_buffers(model)
    state = model.state_dict()  # the tied head under its own name too, as training saves
    params = {k: {"param": v.clone()} for k, v in state.items() if k not in buffers}
    torch.save({"params": params, "buffers": buffers}, folder / DENSE_FILE)
    (folder / "config.yaml").write_text(to_yaml(cfg))
    (folder / TOKENIZER_FILE).write_text(ByteTokenizer().to_json())
    (root / "run" / "latest").write_text("step4")
    return folder
