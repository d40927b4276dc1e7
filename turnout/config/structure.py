"""The structured-data options (``data.ast``: how functions become examples) and the
structure model's (``model.structure``: which encoder reads them).

``validate_structure`` raises ``ConfigError(key, message)`` naming the dotted key.
"""

from __future__ import annotations

from dataclasses import dataclass

from turnout.errors import ConfigError


@dataclass
class AstConfig:
    max_nodes: int = 512
    """A function with more syntax-tree nodes than this is left out (counted)."""
    min_nodes: int = 8
    """A function with fewer nodes than this is left out (a stub: pass, a docstring)."""
    label_tokens: int = 8
    """Tokens of a node's label (identifier or literal, through the run's tokenizer) kept
    per node; the rest are cut."""
    target_vocab: int = 1024
    """Name subtokens the task predicts: the most frequent of the training split; the
    others are '<unk>'."""
    max_name_subtokens: int = 6
    """A predicted name has at most this many subtokens."""
    keep_dunders: bool = False
    """Keep special methods (__init__, __repr__, ...): their names say little about
    their bodies and would be a large share of the examples."""


@dataclass
class StructureModelConfig:
    encoder: str = ""
    """'' (a language model over the token stream), or the encoder of the function-name
    task (data.structure=ast): 'treelstm' (Child-Sum Tree-LSTM over the syntax tree),
    'gnn' (message passing over the syntax graph, model.n_layers layers) or 'transformer'
    (bidirectional attention over the function's nodes in source order, the baseline
    without structure). Width model.d_model, FFN model.ffn_dim."""
    moe: bool = False
    """gnn / transformer: every layer's FFN is an MoE layer of model.moe (router,
    dispatcher, capacity or dropless, expert parallelism)."""


def validate_structure(cfg: AstConfig, prefix: str = "data.ast") -> None:
    for name in ("max_nodes", "min_nodes", "label_tokens", "target_vocab", "max_name_subtokens"):
        value = getattr(cfg, name)
        if value < 1:
            raise ConfigError(f"{prefix}.{name}", f"must be >= 1, got {value}")
    if cfg.min_nodes > cfg.max_nodes:
        raise ConfigError(
            f"{prefix}.min_nodes",
            f"is {cfg.min_nodes}, above {prefix}.max_nodes={cfg.max_nodes}: no function fits",
        )
