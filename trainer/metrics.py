"""Per-layer routing metrics, accumulated over a log interval and reduced over ranks.

``LMOutput.stats`` holds per-layer counters keyed ``layer{i}/{name}``: ``moe_counts``
(long [E], assignments per expert before dropping), ``moe_drop`` (dropped fraction),
``moe_noop`` (no-op share, integrated MoDE), ``mod_capacity`` (realised fraction of
tokens processed), ``mod_pred_acc`` (causal predictor accuracy) and the unweighted aux
terms ``moe_lb`` / ``moe_z`` / ``mod_pred_loss``. ``StatsAccumulator`` sums them over
the micro steps of a log interval; ``reduce`` is a collective (every rank must call
it): expert counts are summed over ALL ranks and then normalised into load fractions;
the scalars are averaged over ranks and micro steps.
"""

from __future__ import annotations

import torch

from turnout.models.lm import LMOutput
from turnout.parallel.dist import all_reduce_sum

_SCALAR_NAMES = {
    "moe_drop": "drop_fraction",
    "moe_noop": "noop_fraction",
    "mod_capacity": "mod_capacity",
    "mod_pred_acc": "mod_pred_acc",
    "moe_lb": "moe_lb",
    "moe_z": "moe_z",
    "mod_pred_loss": "mod_pred_loss",
}


class StatsAccumulator:
    """Sums of the model's stats and aux terms over the micro steps since the last reset."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.counts: dict[str, torch.Tensor] = {}
        self.scalars: dict[str, float] = {}
        self.n = 0

    def add(self, out: LMOutput) -> None:
        self.n += 1
        for key, value in out.stats.items():
            layer, name = key.rsplit("/", 1)
            if name == "moe_counts":
                c = value.detach().to("cpu", torch.float64)
                self.counts[layer] = self.counts.get(layer, 0) + c
            elif name in _SCALAR_NAMES:
                k = f"{layer}/{_SCALAR_NAMES[name]}"
                self.scalars[k] = self.scalars.get(k, 0.0) + float(value)
        for name, value in out.terms.items():
            k = f"aux/{name}"
            self.scalars[k] = self.scalars.get(k, 0.0) + float(value)

    def reduce(self) -> dict[str, float]:
        """Collective: metrics over all ranks since the last reset (then resets)."""
        layers = sorted(self.counts)
        scalar_keys = sorted(self.scalars)
        parts = [self.counts[k] for k in layers]
        parts.append(
            torch.tensor([self.scalars[k] for k in scalar_keys] + [self.n], dtype=torch.float64)
        )
        total = all_reduce_sum(torch.cat(parts))
        out: dict[str, float] = {}
        offset = 0
        for layer in layers:
            n_e = self.counts[layer].numel()
            c = total[offset : offset + n_e]
            offset += n_e
            frac = c / c.sum().clamp_min(1.0)
            for e in range(n_e):
                out[f"{layer}/expert{e}_load"] = float(frac[e])
            out[f"{layer}/load_max"] = float(frac.max())
            out[f"{layer}/load_max_over_mean"] = float(frac.max() * n_e)
        n = float(total[-1]) or 1.0
        for i, k in enumerate(scalar_keys):
            out[k] = float(total[offset + i]) / n
        self.reset()
        return out
