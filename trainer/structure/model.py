"""The structure model a config describes (``model.structure`` with ``data.ast``)."""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from turnout.config import TurnoutConfig
from turnout.models.lm import TransformerLM
from turnout.models.structure import StructureModel
from turnout.trainer.data.structure.ast_graph import EDGE_TYPES, NODE_TYPES


def structure_model(cfg: TurnoutConfig) -> StructureModel:
    """``model.structure.encoder`` over the node types and edge kinds of
    :mod:`~turnout.trainer.data.structure.ast_graph`, label tokens of ``model.vocab_size``
    and ``data.ast.target_vocab`` name subtokens plus ``<unk>`` (the classes a cache
    holds fewer of go unused, so the shapes follow the config alone)."""
    m, ast = cfg.model, cfg.data.ast
    return StructureModel(
        m.structure.encoder,
        num_types=len(NODE_TYPES),
        vocab_size=m.vocab_size,
        edge_types=len(EDGE_TYPES),
        targets=ast.target_vocab + 1,
        max_name=ast.max_name_subtokens,
        d_model=m.d_model,
        ffn_dim=m.ffn_dim,
        layers=m.n_layers,
        moe=m.moe if m.structure.moe else None,
        init_std=m.init_std,
        n_heads=m.n_heads,
        max_nodes=ast.max_nodes,
    )


def dense_twin(cfg: TurnoutConfig) -> TurnoutConfig:
    """The config with dense FFNs in place of the MoE layers (the FLOP fraction's base)."""
    return replace(cfg, model=replace(cfg.model, structure=replace(cfg.model.structure, moe=False)))


def build_model(cfg: TurnoutConfig) -> nn.Module:
    """The run's model: the structure model (``model.structure.encoder`` set) or the
    language model."""
    if cfg.model.structure.encoder:
        return structure_model(cfg)
    return TransformerLM(cfg.model)
