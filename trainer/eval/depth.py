"""Validation of early-exit, ponder and recursion models under their decode rule: loss
and depth.

One pass over the validation windows with ``routing="causal"`` (the exit / halting
threshold of the config, as ``turnout generate`` decodes), all ranks reduced:

- ``val_loss_causal``: the cross-entropy of that pass;
- the depth histogram: ``val_exit_layer<d>`` (fraction of tokens that exit after ``d``
  blocks; ``d = n_layers`` is no exit), ``val_ponder_steps<n>`` (fraction that halt after
  ``n`` applications of the ponder block) or ``val_recursion_depth<n>`` (fraction that
  run ``n`` recursions), with ``val_exit_layer_mean`` / ``val_ponder_steps_mean`` /
  ``val_recursion_depth_mean``;
- ``val_depth_mean``: blocks applied per token, and ``val_expected_flops_per_token``:
  forward FLOPs per token at that distribution (:func:`models.flops.expected_flops`).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from turnout.config.choices import Routing
from turnout.config.model import ModelConfig
from turnout.models.flops import expected_flops
from turnout.parallel.dist import all_reduce_sum
from turnout.trainer.data.batches import BatchSampler
from turnout.trainer.eval.validation import validation_pass


def depth_metric_names(cfg: ModelConfig) -> dict[int, str]:
    """Blocks used -> the histogram metric of that bin."""
    L = cfg.n_layers
    if cfg.uses_exit():
        return {d: f"val_exit_layer{d}" for d in (*cfg.exit.layers, L)}
    steps, per_step = cfg.depth_steps()
    name = "val_recursion_depth" if cfg.uses_recursion() else "val_ponder_steps"
    return {L - 1 + per_step * n: f"{name}{n}" for n in range(1, steps + 1)}


def mean_depth(counts: dict[int, float]) -> float:
    """Mean blocks used per token of a depth histogram (0 when it is empty)."""
    total = sum(counts.values()) or 1.0
    return sum(k * v for k, v in counts.items()) / total


@torch.no_grad()
def histogram_metrics(cfg: ModelConfig, counts: dict[int, float]) -> dict[str, float]:
    """The MLflow metrics of a depth histogram (blocks used -> tokens)."""
    names = depth_metric_names(cfg)
    total = sum(counts.values()) or 1.0
    out = {names[k]: counts.get(k, 0.0) / total for k in names}
    mean = mean_depth(counts)
    L = cfg.n_layers
    if cfg.uses_exit():
        out["val_exit_layer_mean"] = mean
    elif cfg.uses_recursion():
        out["val_recursion_depth_mean"] = (mean - (L - 1)) / cfg.recursion.group
    else:
        out["val_ponder_steps_mean"] = mean - (L - 1)
    out["val_depth_mean"] = mean
    out["val_expected_flops_per_token"] = expected_flops(cfg, counts)
    return out


def depth_eval(
    engine: Any, sampler: BatchSampler, batches: int, cfg: ModelConfig
) -> tuple[float, dict[str, float]]:
    """Collective: (causal validation loss, depth metrics) over all ranks' windows."""
    levels = list(depth_metric_names(cfg))
    over_ranks = partial(all_reduce_sum, name="validation depth")
    res = validation_pass(
        engine, sampler, batches, Routing.CAUSAL, engine.device, levels, over_ranks
    )
    return res.loss, histogram_metrics(cfg, res.depth_counts)
