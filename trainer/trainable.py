"""``train.trainable``: freeze every parameter but the routers (and norms) before the engine.

'routers' trains the MoD routers and causal predictors, the MoE routers, the ponder
halting heads and the recursion routers and predictors; 'routers+norms' also every
RMSNorm weight (block, q/k and final norms); 'all' changes nothing. A frozen parameter
gets ``requires_grad=False`` before DeepSpeed sees the model, so
:func:`turnout.trainer.engine.optimizer_param_groups` leaves it out of the optimizer: no
gradient, no AdamW moments and no fp32 master under any ZeRO stage, and its weight is
bit-equal after every step. Checkpoints still hold it (its weight, zero moments:
:mod:`turnout.trainer.checkpointing.master_state`), so save, load, resume and export
work as for any run.

Call it after ``init_from`` and after expert parallelism is installed (which rebuilds the
expert banks' parameters).
"""

from __future__ import annotations

import logging

from torch import nn

from turnout.config.choices import Trainable
from turnout.errors import ConfigError
from turnout.models.layers import RMSNorm
from turnout.models.mod import MoDBlock
from turnout.models.moe import MoELayer
from turnout.models.ponder import PonderBlock
from turnout.models.recursion import RecursionBlock

KEY = "train.trainable"

log = logging.getLogger("turnout.trainer")


def _router_modules(model: nn.Module) -> list[nn.Module]:
    out: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, MoDBlock):
            out.append(m.router)
            if m.predictor is not None:
                out.append(m.predictor)
        elif isinstance(m, PonderBlock):
            out.append(m.halt)
        elif isinstance(m, RecursionBlock):
            out.append(m.router)
            out.append(m.predictors)
    return out


def trainable_ids(model: nn.Module, mode: str) -> set[int]:
    """``id``s of the parameters that train under ``mode`` (every one for 'all')."""
    params = list(model.parameters())
    if mode == Trainable.ALL:
        return {id(p) for p in params}
    ids = {id(p) for m in _router_modules(model) for p in m.parameters()}
    for m in model.modules():
        if isinstance(m, MoELayer):
            ids.add(id(m.router_DE))
    if not ids:
        raise ConfigError(KEY, f"is {mode!r} but the model has no router parameters")
    if mode == Trainable.ROUTERS_NORMS:
        ids |= {id(p) for m in model.modules() if isinstance(m, RMSNorm) for p in m.parameters()}
    return ids


def apply_trainable(model: nn.Module, mode: str) -> tuple[int, int]:
    """Freeze what ``mode`` does not train; return (trainable, total) parameter counts."""
    keep = trainable_ids(model, mode)
    total = trained = 0
    for p in model.parameters():  # deduplicates tied parameters
        p.requires_grad_(id(p) in keep)
        total += p.numel()
        trained += p.numel() if id(p) in keep else 0
    if mode != Trainable.ALL:
        log.info(
            "train.trainable=%s: %d of %d parameters train (%.2f%%), the rest are frozen",
            mode,
            trained,
            total,
            100.0 * trained / max(total, 1),
        )
    return trained, total
