"""The schema of a ``turnout sweep`` spec: grids of configs trained at fixed FLOP budgets.

A spec names a base config (a preset or YAML file, plus overrides every trial shares)
and one or more grids. A grid crosses its axes (each axis maps a label to the overrides
that label means), its training-FLOP budgets and its seeds; every combination is one
trial, a normal turnout run whose ``train.steps`` is the budget divided by the training
FLOPs of one step. Two grids may share trials (a learning-rate grid at the smallest
budget and the main grid, say): a trial is named by its labels, budget and seed, and
the same name with the same overrides runs once.

Loading checks the spec's own keys and types here; each trial's config is checked by the
sweep on the launcher (:mod:`turnout.launch.sweep.trials`), before any trial starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from turnout.errors import ConfigError

#: Labels and axis names become folder and MLflow run names.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


@dataclass
class SweepGrid:
    name: str = ""
    """What this grid is for (shown in the progress line; '' = its index)."""
    budgets: list[float] = field(default_factory=list)
    """Training FLOPs per trial (forward and backward, as the trainer counts them)."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """``train.seed`` of each repetition."""
    axes: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    """Axis name -> label -> the ``key=value`` overrides that label means. The trials are
    every combination of one label per axis (crossed with budgets and seeds)."""
    overrides: list[str] = field(default_factory=list)
    """Overrides every trial of this grid shares (after the spec's, before the axes')."""


@dataclass
class SweepSpec:
    name: str = ""
    """The sweep's name: its folder ``<dir>/<name>`` and its MLflow parent run."""
    source: str = "tiny"
    """The preset or YAML file every trial starts from."""
    overrides: list[str] = field(default_factory=list)
    """Overrides every trial shares."""
    grids: list[SweepGrid] = field(default_factory=list)
    """One or more grids; their trials are the sweep's."""
    dir: str = ".turnout/sweeps"
    """Where sweeps keep their state (Ray Tune's, each trial's checkpoints and result),
    relative to where ``turnout sweep`` runs."""
    max_concurrent: int = 0
    """Trials at once (0 = as many as the cluster's CPUs hold, each trial taking
    ``launch.num_workers x launch.cpus_per_worker``)."""
    report: str = ""
    """Where ``turnout sweep --report`` writes ``<report>.json/.md/.png`` ('' =
    ``<dir>/<name>/report``)."""


def _check_name(key: str, value: str) -> None:
    if not _NAME.match(value):
        raise ConfigError(key, f"{value!r} must be letters, digits and . _ + - only")


def validate_spec(spec: SweepSpec) -> None:
    """The spec's own rules; ConfigError naming the first key that breaks one."""
    _check_name("name", spec.name)
    if spec.max_concurrent < 0:
        raise ConfigError("max_concurrent", f"must be >= 0, got {spec.max_concurrent}")
    if not spec.grids:
        raise ConfigError("grids", "a sweep needs at least one grid")
    for i, grid in enumerate(spec.grids):
        at = f"grids[{i}]"
        if grid.name:
            _check_name(f"{at}.name", grid.name)
        if not grid.budgets:
            raise ConfigError(f"{at}.budgets", "at least one training-FLOP budget")
        for j, budget in enumerate(grid.budgets):
            if not budget > 0:
                raise ConfigError(f"{at}.budgets[{j}]", f"must be > 0, got {budget}")
        if not grid.seeds:
            raise ConfigError(f"{at}.seeds", "at least one seed")
        if len(set(grid.seeds)) != len(grid.seeds):
            raise ConfigError(f"{at}.seeds", f"repeats a seed: {grid.seeds}")
        for axis, labels in grid.axes.items():
            _check_name(f"{at}.axes", axis)
            if not labels:
                raise ConfigError(f"{at}.axes.{axis}", "an axis needs at least one label")
            for label in labels:
                _check_name(f"{at}.axes.{axis}", str(label))


def _structured(schema: type, data: object, prefix: str) -> Any:
    """``data`` merged into the dataclass ``schema``; ConfigError naming ``prefix + key``."""
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip(".") or "sweep", "must be a mapping")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), data)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{prefix}{key}".rstrip(".") or "sweep", msg) from None


def load_spec(path: str | Path) -> SweepSpec:
    """Read and check a sweep spec; ConfigError naming the spec key (or the file)."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as e:
        raise ConfigError("sweep", f"cannot read {p}: {e.strerror}") from None
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else "invalid YAML"
        raise ConfigError("sweep", f"{p} is not valid YAML ({first})") from None
    if not isinstance(data, dict):
        raise ConfigError("sweep", f"{p} must hold a mapping at the top level")
    data.setdefault("name", p.stem)
    grids = data.pop("grids", [])
    if not isinstance(grids, list):
        raise ConfigError("grids", "must be a list of grids")
    spec = _structured(SweepSpec, data, "")
    spec.grids = [_structured(SweepGrid, g, f"grids[{i}].") for i, g in enumerate(grids)]
    validate_spec(spec)
    return spec
