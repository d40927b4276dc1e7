"""The report's figure, drawn from the report's JSON content alone: one isoFLOP panel per
budget, the optimum loss against budget, and loss against wall seconds.

matplotlib (Agg) is imported inside :func:`draw`, so importing the report costs nothing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from turnout.launch.sweep.study import family_key

NCOLS = 3
#: One marker per budget in the wall-clock panel (colors are families).
MARKERS = "os^Dvp<>"


def _err(std: float | None) -> float:
    """An error bar: NaN (none drawn) where the spread is unknown (one seed)."""
    return float("nan") if std is None else float(std)


def _colors(doc: dict[str, Any]) -> dict[str, Any]:
    import matplotlib.pyplot as plt

    fams = sorted({p["family"] for p in doc["points"]}, key=family_key)
    cycle = plt.get_cmap("tab10")
    return {f: cycle(i % 10) for i, f in enumerate(fams)}


def _legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def _budget_panel(ax: Any, doc: dict[str, Any], budget: float, colors: dict[str, Any]) -> None:
    for fam, color in colors.items():
        pts = [p for p in doc["points"] if p["family"] == fam and p["budget"] == budget]
        if not pts:
            continue
        ax.errorbar(
            [p["params"] for p in pts],
            [p["loss_mean"] for p in pts],
            yerr=[_err(p["loss_std"]) for p in pts],
            fmt="o",
            color=color,
            capsize=3,
            label=fam,
        )
        opt = next(o for o in doc["optima"] if o["family"] == fam and o["budget"] == budget)
        if opt["coeffs"] is not None:
            xs = np.linspace(
                min(p["log10_params"] for p in pts), max(p["log10_params"] for p in pts)
            )
            ax.plot(10**xs, np.polyval(opt["coeffs"], xs), "-", color=color, lw=1)
        marker = "*" if opt["status"] == "interior" else "x"
        ax.plot([opt["params"]], [opt["loss"]], marker, color=color, ms=12, mec="black")
    ax.set_xscale("log")
    ax.set_title(f"budget {budget:.3g} FLOPs")
    ax.set_xlabel("total parameters")
    ax.set_ylabel("val loss (nats/byte)")
    _legend(ax)


def _optima_panel(ax: Any, doc: dict[str, Any], colors: dict[str, Any]) -> None:
    for fam, color in colors.items():
        opts = [o for o in doc["optima"] if o["family"] == fam]
        ax.errorbar(
            [o["budget"] for o in opts],
            [o["loss"] for o in opts],
            yerr=[_err(o["loss_std"]) for o in opts],
            fmt="o-",
            color=color,
            capsize=3,
            label=fam,
        )
    ax.set_xscale("log")
    ax.set_title("optimum loss vs budget")
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("optimum val loss (nats/byte)")
    _legend(ax)


def _wall_panel(ax: Any, doc: dict[str, Any], colors: dict[str, Any]) -> None:
    budgets = sorted({p["budget"] for p in doc["points"]})
    for fam, color in colors.items():
        for i, budget in enumerate(budgets):
            pts = [
                p
                for p in doc["points"]
                if p["family"] == fam and p["budget"] == budget and p["wall_s_mean"] is not None
            ]
            ax.plot(
                [p["wall_s_mean"] for p in pts],
                [p["loss_mean"] for p in pts],
                MARKERS[i % len(MARKERS)],
                color=color,
                label=f"{fam} {budget:.3g}",
            )
    for w in sorted({r["wall_limit_s"] for r in doc["equal_wall"]}):
        ax.axvline(w, color="grey", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_title("loss vs wall seconds (dotted: W per budget)")
    ax.set_xlabel("mean wall seconds")
    ax.set_ylabel("val loss (nats/byte)")
    _legend(ax)


def draw(doc: dict[str, Any], path: Path) -> None:
    """Write the figure of report ``doc`` to ``path`` (PNG, no timestamp in its metadata)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({p["budget"] for p in doc["points"]})
    n = len(budgets) + 2
    rows = math.ceil(n / NCOLS)
    fig, axes = plt.subplots(rows, NCOLS, figsize=(5 * NCOLS, 4 * rows), squeeze=False)
    flat = list(axes.flat)
    colors = _colors(doc)
    for ax, budget in zip(flat[: len(budgets)], budgets, strict=True):
        _budget_panel(ax, doc, budget, colors)
    _optima_panel(flat[len(budgets)], doc, colors)
    _wall_panel(flat[len(budgets) + 1], doc, colors)
    for ax in flat[n:]:
        ax.axis("off")
    fig.suptitle(doc["title"])
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
