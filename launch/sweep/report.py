"""`turnout sweep SPEC.yaml --report`: a sweep's trial records -> the isoFLOP study, written
as ``<stem>.json``, ``<stem>.md`` and ``<stem>.png``.

This module owns the report's one entry, :func:`write_report`, and the JSON document it
writes (:func:`build`); the page and the figure are generated from that document alone, so
the same records give byte-identical JSON and Markdown. Pure: numpy, matplotlib (lazily,
Agg) and the standard library; no Ray, no MLflow.

JSON document::

    title, command
    method       {budgets, seeds, sizes: {family: [{size, params}]}, n_runs, n_fitted,
                  n_failed}
    runs         every record sorted by trial id (keys sorted), plus loss_nats_per_byte
    lr_choice    {family: lr label} for families with an 'lr' axis
    lr_table     [{family, lr, lr_value, budget, size, ...size stats, chosen}]
    points       [{family, budget, size, params, params_active, log10_params, loss_mean,
                   loss_std, losses, seeds, n, wall_s_mean}]   (the runs in the fits)
    optima       [{family, budget, status, note, log10_params, log10_params_std, params,
                   size, params_active, loss, loss_std, n_sizes, n_runs, coeffs}]
    equal_wall   [{budget, family, wall_limit_s, dense_size, size, params, loss_mean,
                   loss_std, wall_s_mean, n}]
    verdict      {budget, win_rule, spread_rule, best_dynamic, moe_vs_dense, trends,
                  sentences}

Losses are nats per byte (val_bpb * ln 2); status is one of interior, edge, no-minimum,
too-few (see :func:`turnout.launch.sweep.fit.optimum`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from turnout.launch.sweep import markdown, plot, study
from turnout.launch.sweep.verdict import verdict


@dataclass(frozen=True)
class Report:
    """What :func:`write_report` wrote: the three files and the JSON document."""

    json_path: Path
    md_path: Path
    png_path: Path
    doc: dict[str, Any]


def _clean(value: Any, sort_keys: bool = False) -> Any:
    """JSON-safe: non-finite floats become None, tuples lists; dict keys sorted on request
    (a record's key order is the caller's, the report's must not depend on it)."""
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda kv: str(kv[0])) if sort_keys else value.items()
        return {str(k): _clean(v, sort_keys) for k, v in items}
    if isinstance(value, (list, tuple)):
        return [_clean(v, sort_keys) for v in value]
    return value


def _run(rec: dict[str, Any]) -> dict[str, Any]:
    return _clean(rec | {"loss_nats_per_byte": study.loss_nats(rec)}, sort_keys=True)


def build(records: Iterable[dict[str, Any]], command: str, title: str) -> dict[str, Any]:
    """The report's JSON document from the trial records (any order)."""
    recs = sorted(records, key=lambda r: str(r["trial"]))
    used = [r for r in recs if study.usable(r)]
    lr_choice, lr_table = study.choose_lr(used)
    points = study.points_of(used, lr_choice)
    optima = study.optima_of(points)
    doc = {
        "title": title,
        "command": command,
        "method": study.method(recs, points),
        "runs": [_run(r) for r in recs],
        "lr_choice": lr_choice,
        "lr_table": lr_table,
        "points": points,
        "optima": optima,
        "equal_wall": study.equal_wall(points, optima),
        "verdict": verdict(optima),
    }
    return _clean(doc)


def dumps(doc: dict[str, Any]) -> str:
    """The JSON file's text."""
    return json.dumps(doc, indent=1, ensure_ascii=False, allow_nan=False) + "\n"


def write_report(
    records: Iterable[dict[str, Any]], out_stem: Path, command: str, title: str
) -> Report:
    """Write ``<out_stem>.json``, ``.md`` and ``.png`` from the trial records alone.

    ``command`` is shown verbatim in the page; ``title`` heads the page and the figure.
    Failed runs (status other than "done", or no finite val_bpb) are listed, not fitted.
    """
    out_stem = Path(out_stem)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    doc = build(records, command, title)
    paths = [out_stem.parent / f"{out_stem.name}{ext}" for ext in (".json", ".md", ".png")]
    json_path, md_path, png_path = paths
    json_path.write_text(dumps(doc), encoding="utf-8")
    # the page and the figure read the document back as written, not the live objects
    written = json.loads(json_path.read_text(encoding="utf-8"))
    md_path.write_text(markdown.render(written, png_path.name), encoding="utf-8")
    plot.draw(written, png_path)
    return Report(json_path, md_path, png_path, written)
