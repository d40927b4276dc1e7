"""A sweep spec expanded into trials, every trial's config checked before any starts.

Each trial is one combination of a grid's axis labels, one budget and one seed. Its
config is the spec's source with, in order, the spec's overrides, the grid's, each
axis label's, then ``train.seed`` and ``train.steps``. The steps make the budget:
``floor(budget / (training FLOPs per token x tokens per step))``, with the FLOPs the
trainer itself counts (:func:`turnout.trainer.metrics.compute.run_flops`) and a step's
tokens ``micro_batch_size x grad_accum x max_seq_len x num_workers``.

A bad key anywhere is one :class:`ConfigError` naming the grid, the trial and the key.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any

from turnout.config import TurnoutConfig
from turnout.config.load import load_config
from turnout.config.root import validate
from turnout.config.sweep import SweepGrid, SweepSpec
from turnout.errors import ConfigError


@dataclass(frozen=True)
class Trial:
    id: str
    """Labels, budget and seed: ``family=moe,size=m|b1e+13|s0`` (unique in a sweep)."""
    grid: str
    labels: dict[str, str]
    budget: float
    seed: int
    overrides: tuple[str, ...]
    """Everything after the source, ``train.steps`` and ``train.seed`` included."""
    steps: int
    train_flops_per_token: float
    train_flops: float
    """What the trial trains for: ``steps`` whole steps, at most the budget."""
    params_total: int
    params_active: int
    d_model: int
    n_layers: int
    lr: float
    workers: int
    """``launch.num_workers x launch.cpus_per_worker``: the CPUs the trial holds."""
    threads: int
    """``launch.cpus_per_worker``: the threads each of its ranks runs."""
    cfg: TurnoutConfig = field(repr=False, compare=False)
    """The trial's validated config (not part of its record: the overrides say it)."""

    @property
    def folder(self) -> str:
        """The trial's folder name (its id with the separators made path-safe)."""
        return re.sub(r"[^A-Za-z0-9=,._+-]", "_", self.id.replace("|", "__"))

    def record(self) -> dict[str, Any]:
        """The trial's static half of a result record (the run adds losses and time)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "cfg"}
        out["labels"] = dict(self.labels)
        out["trial"] = self.id  # the report's name for it
        out["overrides"] = list(self.overrides)
        out["fwd_flops_per_token"] = self.train_flops_per_token / 3.0
        return out


def trial_id(labels: dict[str, str], budget: float, seed: int) -> str:
    axes = ",".join(f"{k}={v}" for k, v in labels.items())
    return f"{axes}|b{budget:.3g}|s{seed}"


def tokens_per_step(cfg: TurnoutConfig) -> int:
    t = cfg.train
    return t.micro_batch_size * t.grad_accum * cfg.model.max_seq_len * cfg.launch.num_workers


def _grid_trials(spec: SweepSpec, index: int, grid: SweepGrid) -> list[Trial]:
    from turnout.models.params import count_params
    from turnout.trainer.metrics.compute import run_flops

    name = grid.name or str(index)
    axes = list(grid.axes.items())
    combos = itertools.product(*(list(labels.items()) for _, labels in axes)) if axes else [()]
    out = []
    for combo in combos:
        labels = {axis: str(label) for (axis, _), (label, _) in zip(axes, combo, strict=True)}
        axis_overrides = [o for _, overrides in combo for o in overrides]
        base = [*spec.overrides, *grid.overrides, *axis_overrides]
        for budget, seed in itertools.product(grid.budgets, grid.seeds):
            tid = trial_id(labels, budget, seed)
            where = f"grids[{index}] ({name}) trial {tid}"
            try:
                cfg = load_config(spec.source, [*base, f"train.seed={seed}"])
                if cfg.data.structure:
                    raise ConfigError(
                        "data.structure",
                        "a sweep sizes language models by FLOPs per token; a function-name "
                        "run's cost follows its batches (benchmarks/structure_names.py)",
                    )
                per_token = run_flops(cfg).per_token
                steps = math.floor(budget / (per_token * tokens_per_step(cfg)))
                if steps < 1:
                    raise ConfigError(
                        "budget", f"{budget:.3g} FLOPs is less than one step of this config"
                    )
                overrides = (*base, f"train.seed={seed}", f"train.steps={steps}")
                cfg = replace(cfg, train=replace(cfg.train, steps=steps))
                validate(cfg)  # the steps fit the rest (warmup, eval and checkpoint periods)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e.key}", e.message) from None
            params = count_params(cfg.model)
            out.append(
                Trial(
                    id=tid,
                    grid=name,
                    labels=labels,
                    budget=budget,
                    seed=seed,
                    overrides=overrides,
                    steps=steps,
                    train_flops_per_token=per_token,
                    train_flops=steps * per_token * tokens_per_step(cfg),
                    params_total=params.total,
                    params_active=params.active,
                    d_model=cfg.model.d_model,
                    n_layers=cfg.model.n_layers,
                    lr=cfg.train.lr,
                    workers=cfg.launch.num_workers * cfg.launch.cpus_per_worker,
                    threads=cfg.launch.cpus_per_worker,
                    cfg=cfg,
                )
            )
    return out


def expand(spec: SweepSpec) -> list[Trial]:
    """Every trial of the spec, each once, in spec order; ConfigError on any bad config
    or on two trials that share a name but not their overrides."""
    seen: dict[str, Trial] = {}
    for i, grid in enumerate(spec.grids):
        for trial in _grid_trials(spec, i, grid):
            other = seen.get(trial.id)
            if other is None:
                seen[trial.id] = trial
            elif other.overrides != trial.overrides:
                raise ConfigError(
                    f"grids[{i}] ({trial.grid}) trial {trial.id}",
                    f"grid {other.grid!r} has a trial of the same labels with other overrides",
                )
    return list(seen.values())
