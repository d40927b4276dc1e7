"""The sweep's trial records as an isoFLOP study: which runs count, which learning rate each
family keeps, per-size seed statistics, one optimum per (family, budget), and the
equal-wall-clock comparison.

Everything here is plain data (lists of dicts, JSON-ready); the math lives in
:mod:`turnout.launch.sweep.fit`. A run counts when its status is "done" and it has a finite
val_bpb; its loss is val_bpb * ln 2 nats per byte.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable
from typing import Any

from turnout.launch.summary import finite_number
from turnout.launch.sweep.fit import STATUS_NOTE, Size, mean_std, optimum

DENSE = "dense"
LN2 = math.log(2.0)
#: Labels that are not part of a size's name: the family and the learning rate.
NOT_SIZE = ("family", "lr")

Record = dict[str, Any]


def sig(value: float, digits: int = 6) -> float:
    """``value`` to ``digits`` significant digits: fitted numbers come out of linear algebra
    whose last bits differ between BLAS builds, and the report should not."""
    return float(f"{value:.{digits}g}")


def loss_nats(rec: Record) -> float | None:
    """Validation loss in nats per byte (val_bpb * ln 2), None without a finite val_bpb."""
    bpb = finite_number(rec.get("val_bpb"))
    return None if bpb is None else bpb * LN2


def usable(rec: Record) -> bool:
    """A run enters fits when it finished and has a loss."""
    return rec.get("status") == "done" and loss_nats(rec) is not None


def family_of(rec: Record) -> str:
    return str(rec["labels"]["family"])


def lr_of(rec: Record) -> str | None:
    lr = rec["labels"].get("lr")
    return None if lr is None else str(lr)


def size_of(rec: Record) -> str:
    """A size's name: its 'size' label, else its other non-family, non-lr labels, else its
    parameter count."""
    labels = rec["labels"]
    if "size" in labels:
        return str(labels["size"])
    rest = ",".join(f"{k}={v}" for k, v in sorted(labels.items()) if k not in NOT_SIZE)
    return rest or f"{float(rec['params_total']):.3g}"


def seed_key(seed: Any) -> tuple[int, float, str]:
    """Numbers in order, anything else after them by its text."""
    if isinstance(seed, (int, float)) and not isinstance(seed, bool):
        return 0, float(seed), ""
    return 1, 0.0, str(seed)


def family_key(family: str) -> tuple[bool, str]:
    """Dense first, then the others alphabetically."""
    return family != DENSE, family


def group(recs: Iterable[Record], key: Callable[[Record], Hashable]) -> dict[Any, list[Record]]:
    out: dict[Any, list[Record]] = {}
    for rec in recs:
        out.setdefault(key(rec), []).append(rec)
    return out


def size_stats(recs: list[Record]) -> dict[str, Any]:
    """Seed statistics of one size's runs (one family, budget and learning rate)."""
    recs = sorted(recs, key=lambda r: (seed_key(r.get("seed")), r["trial"]))
    losses = [loss_nats(r) or 0.0 for r in recs]  # usable runs: never None
    mean, std = mean_std(losses)
    params = sum(float(r["params_total"]) for r in recs) / len(recs)
    active = [a for a in (finite_number(r.get("params_active")) for r in recs) if a is not None]
    walls = [w for w in (finite_number(r.get("wall_s")) for r in recs) if w is not None]
    return {
        "size": size_of(recs[0]),
        "params": params,
        "params_active": sum(active) / len(active) if len(active) == len(recs) else None,
        "log10_params": math.log10(params),
        "loss_mean": mean,
        "loss_std": std,
        "losses": losses,
        "seeds": [r.get("seed") for r in recs],
        "n": len(recs),
        "wall_s_mean": sum(walls) / len(walls) if walls else None,
    }


def _lrs_at(rows: list[dict[str, Any]], budget: float) -> set[str]:
    return {row["lr"] for row in rows if row["budget"] == budget}


def choose_lr(recs: list[Record]) -> tuple[dict[str, str], list[dict[str, Any]]]:
    """Each family's learning rate and the whole LR table.

    A family whose runs carry an 'lr' label keeps the LR whose best size (lowest seed-mean
    loss) is lowest at the family's LR budget: the smallest budget at which it ran more
    than one LR (its LR sweep), else its smallest budget; ties go to the smaller label.
    The table has one row per (family, lr, budget, size) of usable runs.
    """
    labelled = [r for r in recs if lr_of(r) is not None]
    table = []
    for (fam, lr, budget, _), rs in sorted(
        group(labelled, lambda r: (family_of(r), lr_of(r), r["budget"], size_of(r))).items(),
        key=lambda kv: (family_key(kv[0][0]), kv[0][1], kv[0][2], kv[1][0]["params_total"]),
    ):
        table.append(
            {"family": fam, "lr": lr, "lr_value": finite_number(rs[0].get("lr")), "budget": budget}
            | size_stats(rs)
        )
    choice = {}
    for fam, rows in group(table, lambda row: row["family"]).items():
        swept = [b for b in {row["budget"] for row in rows} if len(_lrs_at(rows, b)) > 1]
        at = min(swept or [row["budget"] for row in rows])
        best: dict[str, float] = {}
        for row in rows:
            if row["budget"] == at:
                best[row["lr"]] = min(best.get(row["lr"], math.inf), row["loss_mean"])
        choice[fam] = min(best, key=lambda lr: (best[lr], lr))
    for row in table:
        row["chosen"] = choice[row["family"]] == row["lr"]
    return dict(sorted(choice.items(), key=lambda kv: family_key(kv[0]))), table


def points_of(recs: list[Record], lr_choice: dict[str, str]) -> list[dict[str, Any]]:
    """Seed statistics per (family, budget, size) of the runs that enter the fits: usable,
    and at the family's chosen LR where it has one."""
    kept = [r for r in recs if family_of(r) not in lr_choice or lr_of(r) == lr_choice[family_of(r)]]
    out = []
    for (fam, budget, _), rs in group(
        kept, lambda r: (family_of(r), r["budget"], size_of(r))
    ).items():
        out.append({"family": fam, "budget": budget} | size_stats(rs))
    return sorted(out, key=lambda p: (family_key(p["family"]), p["budget"], p["params"], p["size"]))


def optima_of(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One optimum per (family, budget): see :func:`turnout.launch.sweep.fit.optimum`."""
    out = []
    for (fam, budget), pts in group(points, lambda p: (p["family"], p["budget"])).items():
        opt = optimum([Size(p["log10_params"], tuple(p["losses"])) for p in pts])
        near = pts[opt.nearest]
        out.append(
            {
                "family": fam,
                "budget": budget,
                "status": opt.status,
                "note": STATUS_NOTE[opt.status],
                "log10_params": sig(opt.x),
                "log10_params_std": sig(opt.x_std),
                "params": sig(10**opt.x),
                "size": near["size"],
                "params_active": near["params_active"],
                "loss": sig(opt.loss),
                "loss_std": sig(opt.loss_std),
                "n_sizes": len(pts),
                "n_runs": sum(p["n"] for p in pts),
                "coeffs": None if opt.coeffs is None else [sig(c) for c in opt.coeffs],
            }
        )
    return sorted(out, key=lambda o: (o["budget"], family_key(o["family"])))


def equal_wall(points: list[dict[str, Any]], optima: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per budget with a dense optimum: W = mean wall seconds of dense's optimum size (the
    measured size nearest to it), and per family its best seed-mean loss among sizes whose
    mean wall seconds are <= W (size None: none within W)."""
    out = []
    for opt in (o for o in optima if o["family"] == DENSE):
        budget = opt["budget"]
        at = [p for p in points if p["budget"] == budget]
        dense_pt = next(p for p in at if p["family"] == DENSE and p["size"] == opt["size"])
        limit = dense_pt["wall_s_mean"]
        if limit is None:
            continue
        for fam, pts in sorted(
            group(at, lambda p: p["family"]).items(), key=lambda kv: family_key(kv[0])
        ):
            within = [p for p in pts if p["wall_s_mean"] is not None and p["wall_s_mean"] <= limit]
            best = min(within, key=lambda p: (p["loss_mean"], p["params"]), default=None)
            row = {
                "budget": budget,
                "family": fam,
                "wall_limit_s": limit,
                "dense_size": opt["size"],
            }
            row |= {
                k: None if best is None else best[k]
                for k in ("size", "params", "loss_mean", "loss_std", "wall_s_mean", "n")
            }
            out.append(row)
    return out


def method(recs: list[Record], points: list[dict[str, Any]]) -> dict[str, Any]:
    """What the study is made of, for the report's method paragraph (``recs``: every run,
    failed ones included; seeds and sizes: those in the fits)."""
    sizes: dict[str, dict[str, float]] = {}
    for p in points:
        sizes.setdefault(p["family"], {})[p["size"]] = p["params"]
    return {
        "budgets": sorted({r["budget"] for r in recs}),
        "seeds": sorted({s for p in points for s in p["seeds"]}, key=seed_key),
        "sizes": {
            f: [{"size": s, "params": n} for s, n in sorted(v.items(), key=lambda kv: kv[1])]
            for f, v in sorted(sizes.items(), key=lambda kv: family_key(kv[0]))
        },
        "n_runs": len(recs),
        "n_fitted": sum(p["n"] for p in points),
        "n_failed": sum(not usable(r) for r in recs),
    }
