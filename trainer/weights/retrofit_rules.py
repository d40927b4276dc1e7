"""Retrofitting dynamic depth onto a dense source in ``train.init_from``: pure rules.

A dense source block becomes a MoD-routed one (``model.layer_pattern``: 'dense' -> 'mod',
'moe' -> 'mode', or 'dense' -> 'mode' with upcycling at once): the source block's weights
move under ``layers.<i>.block.``, the new router is zero and a causal predictor (if any)
keeps its fresh init. Early exits (``model.exit.layers``) add no weights: every exit
reads the final norm and LM head the model already has (shared, as in LayerSkip), so the
source's final norm and head are the exits' from the first step.

What the first forward is, stated by :func:`retrofit_note`: a MoD-routed token's output is
``x + g(score) * increment`` (design 3.2). A router without a bias on the residual stream
gives the same ``g`` to every token only when its weight is zero, where ``g`` is
``sigmoid(0) = 0.5`` ('sigmoid') or ``0`` ('identity'); no init reproduces the dense
block (``g = 1``) for every token. So with a zero router and capacity 1 the first forward
is the source's with each retrofitted block's increment halved ('sigmoid') or removed
('identity'), exactly; below capacity 1 a fraction of every sequence also skips the block,
chosen at init by the top-k's order among tied (zero) scores.
"""

from __future__ import annotations

import re
from typing import TypeVar

from turnout.config.choices import RouterGate
from turnout.config.model import ModelConfig
from turnout.errors import ConfigError
from turnout.models.routing import mod_capacity

_LAYER = re.compile(r"^layers\.(\d+)\.")
_NEW_MOD = re.compile(r"^layers\.\d+\.(router\.weight|predictor\..+)$")


def retrofitted_layers(src: ModelConfig, dst: ModelConfig) -> list[int]:
    """Layers dense in the source and MoD-routed here; ConfigError for a ponder or
    recursion source layer."""
    out = []
    for i, (s, d) in enumerate(zip(src.blocks(), dst.blocks(), strict=True)):
        if d.mod_routed and not s.mod_routed:
            if s.ponder or s.recursion:
                raise ConfigError(
                    "model.layer_pattern",
                    f"layer {i} is a {s.name} block in the source: it cannot become MoD-routed",
                )
            out.append(i)
    return out


V = TypeVar("V")


def rename_source(state: dict[str, V], layers: list[int]) -> dict[str, V]:
    """The source's keys as the retrofitted model names them: layer i's -> ``layers.i.block.``.

    Works on any mapping (shapes or tensors): the values are kept."""
    if not layers:
        return state
    moved = set(layers)
    out: dict[str, V] = {}
    for key, value in state.items():
        m = _LAYER.match(key)
        if m and int(m.group(1)) in moved:
            key = f"layers.{m.group(1)}.block.{key[m.end() :]}"
        out[key] = value
    return out


def new_mod_part(key: str) -> str | None:
    """'zero' for a new MoD router weight, 'fresh' for its predictor, None otherwise."""
    m = _NEW_MOD.match(key)
    if m is None:
        return None
    return "zero" if m.group(1) == "router.weight" else "fresh"


def retrofit_note(src: ModelConfig, dst: ModelConfig) -> str:
    """The first forward's relation to the source ('' when nothing was retrofitted)."""
    layers = retrofitted_layers(src, dst)
    parts = []
    if layers:
        c = dst.mod.capacity
        S = dst.max_seq_len
        k = mod_capacity(S, c)
        if dst.mod.router_gate == RouterGate.IDENTITY:
            how = "g(0) = 0: the routed blocks add nothing (the source without them)"
        else:
            how = "each chosen token's increment is scaled by sigmoid(0) = 0.5"
        if k >= S:
            run = "every token runs them (capacity 1)"
        else:
            run = (
                f"capacity {c}: {k} of {S} positions run them, {1 - k / S:.1%} of each "
                "sequence skips them, chosen among tied zero scores"
            )
        parts.append(
            f"MoD retrofitted onto layers {layers} with zero routers: {run}; {how} "
            "(a bias-free router cannot give g = 1 to every token, so not the source's)"
        )
    new_exits = sorted(set(dst.exit.layers) - set(src.exit.layers))
    if new_exits:
        parts.append(
            f"early exits at depths {new_exits} share the source's final norm and head "
            "(no new weights); the final logits are unchanged by them"
        )
    return "; ".join(parts)
