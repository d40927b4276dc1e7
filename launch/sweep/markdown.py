"""The report's Markdown page, generated from the report's JSON content alone.

Same JSON -> byte-identical page: every number is formatted here with a fixed format, every
sentence of the verdict comes from the JSON.
"""

from __future__ import annotations

import math
from typing import Any

from turnout.launch.sweep.fit import BOOTSTRAP_DRAWS

LN2 = math.log(2.0)


def si(value: float | None) -> str:
    """1234567 -> '1.23 M'; None -> 'n/a'."""
    if value is None:
        return "n/a"
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.3g}"


def num(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def pm(loss: float | None, std: float | None) -> str:
    return "n/a" if loss is None else f"{loss:.4f} ± {num(std, '.4f')}"


def bits(nats: float | None) -> str:
    return num(None if nats is None else nats / LN2, ".4f")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A GitHub table; a '|' inside a cell (trial ids have them) is escaped, even in code."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]


def method(doc: dict[str, Any]) -> str:
    m = doc["method"]
    sizes = "; ".join(
        f"{fam}: " + ", ".join(f"{s['size']} ({si(s['params'])})" for s in ss)
        for fam, ss in m["sizes"].items()
    )
    lr = ", ".join(f"{f} {lr}" for f, lr in doc["lr_choice"].items()) or "none (no 'lr' labels)"
    return (
        f"Training-FLOP budgets {', '.join(f'{b:.3g}' for b in m['budgets'])}; sizes (total "
        f"parameters) {sizes}; seeds {', '.join(str(s) for s in m['seeds'])}. {m['n_runs']} "
        f"runs, {m['n_failed']} failed or without a loss (listed, not fitted), "
        f"{m['n_fitted']} in the fits. Loss is validation nats per byte (val_bpb x ln 2). "
        "Learning rate: for each family with an 'lr' axis, the LR whose best size has the "
        f"lowest seed-mean loss at the smallest budget where that family tried several LRs "
        f"(else its smallest), used at every budget ({lr}). "
        "Per family and budget, loss = a x^2 + b x + c with x = log10(total parameters) is "
        "least-squares fitted to every seed point; the optimum is its vertex when a > 0 and "
        "the vertex lies within the sizes, else the best measured size, flagged 'edge' "
        "(widen the sizes), 'no-minimum' (a <= 0) or 'too-few' (fewer than 3 sizes). "
        f"Stds of the optimum come from {BOOTSTRAP_DRAWS} bootstrap draws that resample each "
        "size's seeds (fixed RNG seed); seed stds are sample stds (ddof 1)."
    )


def optima_table(doc: dict[str, Any]) -> list[str]:
    head = ["family", "budget", "status", "loss nats/byte", "bits/byte", "log10 params"]
    head += ["params at optimum", "nearest size", "active params (nearest)", "sizes", "runs"]
    rows = [
        [o["family"], f"{o['budget']:.3g}", o["status"], pm(o["loss"], o["loss_std"])]
        + [bits(o["loss"]), pm(o["log10_params"], o["log10_params_std"]), si(o["params"])]
        + [o["size"], si(o["params_active"]), str(o["n_sizes"]), str(o["n_runs"])]
        for o in doc["optima"]
    ]
    return table(head, rows)


def equal_wall_table(doc: dict[str, Any]) -> list[str]:
    head = ["budget", "W s (dense size)", "family", "best size within W", "params"]
    head += ["loss nats/byte", "bits/byte", "wall s", "seeds"]
    rows = []
    for r in doc["equal_wall"]:
        row = [f"{r['budget']:.3g}", f"{r['wall_limit_s']:.1f} ({r['dense_size']})", r["family"]]
        if r["size"] is None:
            rows.append(row + ["none within W"] + ["n/a"] * 5)
            continue
        row += [r["size"], si(r["params"]), pm(r["loss_mean"], r["loss_std"])]
        rows.append(row + [bits(r["loss_mean"]), f"{r['wall_s_mean']:.1f}", str(r["n"])])
    return table(head, rows)


def lr_table(doc: dict[str, Any]) -> list[str]:
    head = ["family", "lr", "budget", "size", "params", "loss nats/byte", "seeds", "chosen"]
    rows = [
        [r["family"], r["lr"], f"{r['budget']:.3g}", r["size"], si(r["params"])]
        + [pm(r["loss_mean"], r["loss_std"]), str(r["n"]), "yes" if r["chosen"] else ""]
        for r in doc["lr_table"]
    ]
    return table(head, rows) if rows else ["No run carries an 'lr' label."]


def run_table(doc: dict[str, Any]) -> list[str]:
    head = ["trial", "family", "size", "lr", "seed", "budget", "steps", "params total"]
    head += ["params active", "fwd FLOPs/token", "val nats/byte", "bits/byte", "wall s"]
    rows = []
    for r in doc["runs"]:
        labels = r.get("labels", {})
        rows.append(
            [f"`{r['trial']}`", str(labels.get("family")), str(labels.get("size", "-"))]
            + [str(labels.get("lr", "-")), str(r.get("seed")), num(r.get("budget"), ".3g")]
            + [str(r.get("steps")), si(r.get("params_total")), si(r.get("params_active"))]
            + [si(r.get("fwd_flops_per_token")), num(r.get("loss_nats_per_byte"), ".4f")]
            + [num(r.get("val_bpb"), ".4f"), num(r.get("wall_s"), ".1f"), str(r.get("status"))]
        )
    return table([*head, "status"], rows)


def render(doc: dict[str, Any], png_name: str) -> str:
    """The page: title, command, method, the optima, equal-wall-clock, LR and run tables,
    the verdict sentences and the plot."""
    lines = [f"# {doc['title']}", "", "```sh", doc["command"], "```", "", "## Method", ""]
    lines += [method(doc), "", "## Optima per family and budget", ""]
    lines += optima_table(doc) + ["", "## Equal wall-clock", ""]
    lines += [
        "Per budget, W is the mean wall seconds of dense's optimum size (the measured size "
        "nearest its optimum); each family's best seed-mean loss among its sizes whose mean "
        "wall seconds are at most W.",
        "",
    ]
    lines += equal_wall_table(doc) + ["", "## Learning rates", ""]
    lines += lr_table(doc) + ["", "## Verdict", ""]
    v = doc["verdict"]
    lines += [f"Rules: {v['win_rule']} (best dynamic family); MoE: {v['spread_rule']}.", ""]
    lines += [f"- {s}" for s in v["sentences"]]
    lines += ["", f"![isoFLOP curves]({png_name})", "", "## Runs", ""]
    return "\n".join(lines + run_table(doc)) + "\n"
