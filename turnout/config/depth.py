"""Validation of the variable-depth parts of a model config: early exit (model.exit),
adaptive computation (model.ponder) and Mixture-of-Recursions (model.recursion).

Each check raises ``ConfigError(key, message)`` naming the dotted key.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from turnout.config.choices import Predictor, RecursionCache, RecursionRouting, RouterGate
from turnout.errors import ConfigError

if TYPE_CHECKING:
    from turnout.config.model import ModelConfig


def positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(key, f"must be > 0, got {value}")


def _unit(key: str, value: float, top_open: bool = False) -> None:
    if not (0.0 <= value < 1.0 if top_open else 0.0 <= value <= 1.0):
        raise ConfigError(key, f"must be in [0, 1{')' if top_open else ']'}, got {value}")


def validate_depth(cfg: ModelConfig, prefix: str) -> None:
    """Early exit (model.exit) and adaptive computation (model.ponder)."""
    e, p = cfg.exit, cfg.ponder
    x = f"{prefix}.exit"
    for i, d in enumerate(e.layers):
        if not 1 <= d < cfg.n_layers or (i and d <= e.layers[i - 1]):
            raise ConfigError(
                f"{x}.layers",
                f"must be increasing depths in [1, n_layers-1={cfg.n_layers - 1}], got {e.layers}",
            )
    if e.loss_weights and len(e.loss_weights) != len(e.layers):
        raise ConfigError(
            f"{x}.loss_weights",
            f"needs one weight per exit ({len(e.layers)}) or none, got {len(e.loss_weights)}",
        )
    if any(w < 0 for w in e.loss_weights):
        raise ConfigError(f"{x}.loss_weights", f"must be >= 0, got {e.loss_weights}")
    if e.loss_coef < 0:
        raise ConfigError(f"{x}.loss_coef", "must be >= 0")
    _unit(f"{x}.layer_dropout", e.layer_dropout, top_open=True)
    _unit(f"{x}.threshold", e.threshold)
    q = f"{prefix}.ponder"
    if p.max_steps < 1:
        raise ConfigError(f"{q}.max_steps", f"must be >= 1, got {p.max_steps}")
    if not 0.0 < p.prior <= 1.0:
        raise ConfigError(f"{q}.prior", f"must be in (0, 1], got {p.prior}")
    if p.kl_coef < 0:
        raise ConfigError(f"{q}.kl_coef", "must be >= 0")
    _unit(f"{q}.threshold", p.threshold)
    ponders = sum(k.ponder for k in cfg.blocks())
    if ponders > 1:
        raise ConfigError(
            f"{prefix}.layer_pattern",
            f"at most one 'ponder' block per model (the cycled pattern gives {ponders})",
        )
    if ponders and e.layers:
        raise ConfigError(f"{x}.layers", "early exit and a 'ponder' block cannot be combined")
    _validate_recursion(cfg, prefix, ponders)


def _validate_recursion(cfg: ModelConfig, prefix: str, ponders: int) -> None:
    """Mixture-of-Recursions (model.recursion)."""
    rc = cfg.recursion
    k = f"{prefix}.recursion"
    if rc.max_recursions < 1:
        raise ConfigError(f"{k}.max_recursions", f"must be >= 1, got {rc.max_recursions}")
    if rc.group < 1:
        raise ConfigError(f"{k}.group", f"must be >= 1, got {rc.group}")
    if rc.routing not in RecursionRouting.values():
        raise ConfigError(
            f"{k}.routing", f"must be {RecursionRouting.spelled()}, got {rc.routing!r}"
        )
    if rc.cache not in RecursionCache.values():
        raise ConfigError(f"{k}.cache", f"must be {RecursionCache.spelled()}, got {rc.cache!r}")
    if rc.predictor not in Predictor.values():
        raise ConfigError(f"{k}.predictor", f"must be {Predictor.spelled()}, got {rc.predictor!r}")
    if rc.router_gate not in RouterGate.values():
        raise ConfigError(
            f"{k}.router_gate", f"must be {RouterGate.spelled()}, got {rc.router_gate!r}"
        )
    positive(f"{k}.predictor_hidden", rc.predictor_hidden)
    for name in ("predictor_loss_coef", "balance_coef"):
        value = getattr(rc, name)
        if not 0 <= value < math.inf:
            raise ConfigError(f"{k}.{name}", f"must be >= 0, got {value}")
    caps = rc.capacities
    if caps and len(caps) != rc.max_recursions:
        raise ConfigError(
            f"{k}.capacities",
            f"needs one capacity per recursion ({rc.max_recursions}) or none, got {len(caps)}",
        )
    if any(not 0.0 < c <= 1.0 for c in caps) or any(
        b > a for a, b in zip(caps, caps[1:], strict=False)
    ):
        raise ConfigError(f"{k}.capacities", f"must be non-increasing in (0, 1], got {caps}")
    recursions = sum(b.recursion for b in cfg.blocks())
    if recursions > 1:
        raise ConfigError(
            f"{prefix}.layer_pattern",
            f"at most one 'recursion' entry per model (the cycled pattern gives {recursions})",
        )
    if recursions and cfg.exit.layers:
        raise ConfigError(
            f"{prefix}.exit.layers", "early exit and a 'recursion' block cannot be combined"
        )
    if recursions and ponders:
        raise ConfigError(
            f"{prefix}.layer_pattern", "a 'ponder' and a 'recursion' block cannot be combined"
        )
