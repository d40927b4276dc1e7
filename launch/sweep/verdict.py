"""The study's verdict: what the optima say at the largest budget, and nothing more.

Two comparisons against dense's optimum at the largest budget that has one: the best
dynamic family (lowest optimum loss among the non-dense families) under the win rule, and
MoE under the spread rule. Every dynamic family that does not win gets the straight-line
trend of its gap to dense against log10(budget), and the budget where that line would
reach the win side, if it falls. The sentences are generated from these numbers only.
"""

from __future__ import annotations

import math
from typing import Any

from turnout.launch.sweep.fit import crossing, linear_trend
from turnout.launch.sweep.study import DENSE, sig

#: How much lower (nats/byte) a family's optimum must be to win.
WIN_MARGIN = 0.02
MOE = "moe"
WIN_RULE = (
    f"a family wins when its optimum loss is at least {WIN_MARGIN} nats/byte below dense's "
    "AND |difference| > loss_std(dense) + loss_std(family) (each the bootstrap std of an "
    "optimum); it loses under the same rule mirrored, and otherwise ties"
)
SPREAD_RULE = (
    "win/lose when |difference| > loss_std(dense) + loss_std(family), by its sign; "
    "otherwise a tie within the spread"
)

Optimum = dict[str, Any]


def compare(fam: Optimum, dense: Optimum, margin: float) -> dict[str, Any]:
    """``fam`` against ``dense`` at one budget; diff = family minus dense (negative: the
    family is lower). Win/lose need |diff| >= margin and |diff| > the summed stds."""
    diff = fam["loss"] - dense["loss"]
    spread = fam["loss_std"] + dense["loss_std"]
    clear = abs(diff) > spread and abs(diff) >= margin
    outcome = "tie" if not clear else "win" if diff < 0 else "lose"
    return {
        "family": fam["family"],
        "loss": fam["loss"],
        "loss_std": fam["loss_std"],
        "status": fam["status"],
        "dense_loss": dense["loss"],
        "dense_loss_std": dense["loss_std"],
        "dense_status": dense["status"],
        "diff": sig(diff),
        "spread": sig(spread),
        "margin": margin,
        "outcome": outcome,
    }


def trend(family: str, optima: list[Optimum], budget: float) -> dict[str, Any]:
    """The gap (family minus dense optimum loss) against log10(budget) over the budgets where
    both have an optimum, and where its line would reach the win side: 0 while the family
    is above dense, -WIN_MARGIN once it is below."""
    dense = {o["budget"]: o["loss"] for o in optima if o["family"] == DENSE}
    pairs = sorted(
        (o["budget"], o["loss"] - dense[o["budget"]])
        for o in optima
        if o["family"] == family and o["budget"] in dense
    )
    gap = dict(pairs)[budget]
    target = 0.0 if gap > 0 else -WIN_MARGIN
    out: dict[str, Any] = {"family": family, "n_budgets": len(pairs), "gap": sig(gap)}
    out |= {"target": target, "slope": None, "intercept": None, "crossing_log10_budget": None}
    if gap <= -WIN_MARGIN:
        return out | {"note": "already the margin below dense; the spread decides"}
    line = linear_trend([math.log10(b) for b, _ in pairs], [g for _, g in pairs])
    if line is None:
        return out | {"note": "fewer than 2 budgets: no trend"}
    out |= {"slope": sig(line.slope), "intercept": sig(line.intercept)}
    at = crossing(line, target)
    if at is None:
        return out | {"note": "does not trend toward crossing (slope >= 0)"}
    return out | {"crossing_log10_budget": sig(at), "note": "crosses"}


def _pm(loss: float, std: float) -> str:
    return f"{loss:.4f} ± {std:.4f}"


def _fitted(c: dict[str, Any]) -> str:
    """A clause naming optima that are best measured points rather than fitted minima."""
    odd = [
        (n, s)
        for n, s in ((c["family"], c["status"]), (DENSE, c["dense_status"]))
        if s != "interior"
    ]
    if not odd:
        return ""
    return " (" + "; ".join(f"{n}'s optimum is {s}: its best measured size" for n, s in odd) + ")"


def headline_sentence(c: dict[str, Any], budget: float) -> str:
    f = c["family"]
    head = (
        f"At the largest budget ({budget:.3g} training FLOPs) the best dynamic family is {f}: "
        f"optimum loss {_pm(c['loss'], c['loss_std'])} nats/byte against dense's "
        f"{_pm(c['dense_loss'], c['dense_loss_std'])}, a difference of {c['diff']:+.4f} "
        f"({f} minus dense) with a spread of {c['spread']:.4f}{_fitted(c)}. "
    )
    if c["outcome"] == "win":
        return head + f"{f} wins: at least {WIN_MARGIN} lower and outside the spread."
    if c["outcome"] == "lose":
        return head + f"{f} does not win: it is at least {WIN_MARGIN} higher, outside the spread."
    why = []
    if c["diff"] >= 0:
        why.append("it is not below dense")
    elif c["diff"] > -WIN_MARGIN:
        why.append(f"it is less than {WIN_MARGIN} nats/byte below dense")
    if abs(c["diff"]) <= c["spread"]:
        why.append("the difference is within the spread")
    return head + f"{f} does not win: {' and '.join(why)}."


def moe_sentence(c: dict[str, Any], budget: float) -> str:
    word = {"win": "wins", "lose": "loses", "tie": "ties within the spread"}[c["outcome"]]
    return (
        f"MoE against dense at equal training FLOPs ({budget:.3g}): "
        f"{_pm(c['loss'], c['loss_std'])} vs {_pm(c['dense_loss'], c['dense_loss_std'])} "
        f"nats/byte, difference {c['diff']:+.4f}, spread {c['spread']:.4f}{_fitted(c)}: "
        f"MoE {word}."
    )


def trend_sentence(t: dict[str, Any], budget: float) -> str:
    f, gap = t["family"], t["gap"]
    head = f"{f} (gap to dense {gap:+.4f} at {budget:.3g})"
    if t["slope"] is None:
        return f"{head}: {t['note']}."
    line = (
        f"{head}: the straight line of the gap against log10(budget) over {t['n_budgets']} "
        f"budgets has slope {t['slope']:+.4f} nats/byte per decade"
    )
    at = t["crossing_log10_budget"]
    if at is None:
        return f"{line}; it does not trend toward crossing."
    where = f"reach {t['target']:+.2f}" if t["target"] else "cross zero"
    tail = "" if at > math.log10(budget) else ", at or below the largest budget measured"
    flops = f"{10**at:.3g}" if at < 300 else f"10^{at:.1f}"
    return f"{line}; it would {where} at about {flops} training FLOPs{tail}."


def verdict(optima: list[Optimum]) -> dict[str, Any]:
    """The verdict from the optima (see the module docstring)."""
    dense_at = {o["budget"]: o for o in optima if o["family"] == DENSE}
    budget = max(dense_at, default=None)
    out: dict[str, Any] = {"budget": budget, "win_rule": WIN_RULE, "spread_rule": SPREAD_RULE}
    out |= {"best_dynamic": None, "moe_vs_dense": None, "trends": []}
    if budget is None:
        return out | {"sentences": ["No dense optimum in the data: no verdict."]}
    dynamic = [o for o in optima if o["budget"] == budget and o["family"] != DENSE]
    if not dynamic:
        return out | {"sentences": [f"No dynamic family has an optimum at {budget:.3g}."]}
    rows = [compare(o, dense_at[budget], WIN_MARGIN) for o in dynamic]
    best = min(rows, key=lambda c: (c["loss"], c["family"]))
    sentences = [headline_sentence(best, budget)]
    moe = next((o for o in dynamic if o["family"] == MOE), None)
    if moe is not None:
        out["moe_vs_dense"] = compare(moe, dense_at[budget], 0.0)
        sentences.append(moe_sentence(out["moe_vs_dense"], budget))
    else:
        sentences.append(f"No MoE optimum at {budget:.3g}: no MoE comparison.")
    trends = [trend(c["family"], optima, budget) for c in rows if c["outcome"] != "win"]
    sentences += [trend_sentence(t, budget) for t in trends]
    return out | {"best_dynamic": best, "trends": trends, "sentences": sentences}
