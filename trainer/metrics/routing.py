"""Per-layer routing metrics, accumulated over a log interval and reduced over ranks.

``LMOutput.stats[i]`` holds layer i's aux terms and statistics by ``Term``; what each
becomes in MLflow is the table ``turnout.models.terms.TERMS``: the expert counts are
summed over ALL ranks and micro steps, then summarised per layer by
:func:`turnout.trainer.metrics.load_stats.load_stats` (max, max and min over mean, CV, entropy,
dead experts) and, while the experts of all layers number at most
``expert_series_max``, normalised into per-expert loads (``layer<i>/expert<e>_load``;
beyond that the heatmap of ``trainer/metrics/load_view.py`` shows them); every other per-layer
value is averaged over ranks and micro steps under its table metric name; the losses
summed over layers also go to ``aux/<name>``. ``StatsAccumulator`` sums over the micro
steps of a log interval; ``reduce`` is a collective (every rank must call it). A name
missing from the table raises.
"""

from __future__ import annotations

import torch

from turnout.models.lm import LMOutput
from turnout.models.terms import EXPERT_LOAD, spec
from turnout.parallel.dist import all_reduce_sum
from turnout.trainer.metrics.load_stats import load_stats

#: Default of ``tracking.expert_series_max`` for callers without a config.
EXPERT_SERIES_MAX = 64


def layer_metric(layer: int, metric: str) -> str:
    """The MLflow name of a per-layer metric: ``layer<i>/<metric>``."""
    return f"layer{layer}/{metric}"


class StatsAccumulator:
    """Sums of the model's stats and aux terms over the micro steps since the last reset."""

    def __init__(self, expert_series_max: int = EXPERT_SERIES_MAX) -> None:
        self.expert_series_max = expert_series_max
        """Per-expert load series only while the MoE layers' experts total at most this."""
        self.last_loads: dict[int, torch.Tensor] = {}
        """The global counts per layer of the last ``reduce`` (float64; kept after it)."""
        self.reset()

    def reset(self) -> None:
        self.counts: dict[int, torch.Tensor] = {}
        """Expert counts per layer index (float64, this rank)."""
        self.scalars: dict[str, float] = {}
        """Sums of the scalar metrics, by MLflow name."""
        self.n = 0

    def _add_scalar(self, key: str, value: torch.Tensor) -> None:
        self.scalars[key] = self.scalars.get(key, 0.0) + float(value)

    def add(self, out: LMOutput) -> None:
        self.n += 1
        for layer, aux in enumerate(out.stats):
            for name, value in aux.items():
                s = spec(name)
                if s.is_counts:
                    c = value.detach().to("cpu", torch.float64)
                    self.counts[layer] = self.counts.get(layer, 0) + c
                else:
                    (metric,) = s.metrics
                    self._add_scalar(layer_metric(layer, metric), value)
        for name, value in out.terms.items():
            key = spec(name).aux_metric()
            if key is None:
                raise KeyError(f"{name!r} is in LMOutput.terms but is not a loss in TERMS")
            self._add_scalar(key, value)

    def reduce(self) -> dict[str, float]:
        """Collective: metrics over all ranks since the last reset (then resets)."""
        layers = sorted(self.counts)
        scalar_keys = sorted(self.scalars)
        parts = [self.counts[i] for i in layers]
        parts.append(
            torch.tensor([self.scalars[k] for k in scalar_keys] + [self.n], dtype=torch.float64)
        )
        total = all_reduce_sum(torch.cat(parts))
        out: dict[str, float] = {}
        offset = 0
        series = sum(self.counts[i].numel() for i in layers) <= self.expert_series_max
        self.last_loads = {}
        for layer in layers:
            n_e = self.counts[layer].numel()
            c = total[offset : offset + n_e]
            offset += n_e
            self.last_loads[layer] = c.clone()
            if series:
                frac = c / c.sum().clamp_min(1.0)
                for e in range(n_e):
                    out[layer_metric(layer, EXPERT_LOAD.replace("<e>", str(e)))] = float(frac[e])
            for name, value in load_stats(c).items():
                out[layer_metric(layer, name)] = value
        n = float(total[-1]) or 1.0
        for i, k in enumerate(scalar_keys):
            out[k] = float(total[offset + i]) / n
        self.reset()
        return out
