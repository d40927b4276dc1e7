"""The sweep report: synthetic trial records from known isoFLOP curves go in, the fitted
optima, flags, LR choice, equal-wall-clock table, verdict sentences and the three files
come out (turnout.launch.sweep.report)."""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from turnout.launch.sweep.fit import Size, optimum
from turnout.launch.sweep.report import build, write_report

LN2 = math.log(2.0)
XS = (5.0, 5.5, 6.0, 6.5, 7.0)  # log10(total params) of the five sizes
NAMES = ("xs", "s", "m", "l", "xl")
CMD = "turnout sweep sweeps/isoflop.yaml --report"

# Exact-arithmetic tolerance: noiseless records put every seed point on the quadratic, so
# the fit is exact up to float64 rounding of a 3x3 least-squares solve on x in [5, 7]
# (condition number ~1e3, so ~1e-13); 1e-9 leaves four orders of margin.
EXACT = 1e-9


def record(
    family: str,
    size: str,
    x: float,
    budget: float,
    seed: int,
    loss: float,
    lr: str | None = "1e-3",
    wall: float = 100.0,
    status: str = "done",
) -> dict[str, Any]:
    labels = {"family": family, "size": size} | ({} if lr is None else {"lr": lr})
    params = 10**x
    return {
        "trial": f"family={family},lr={lr},size={size}|b{budget:.0e}|s{seed}",
        "labels": labels,
        "budget": budget,
        "seed": seed,
        "steps": 100,
        "d_model": 64,
        "n_layers": 2,
        "params_total": params,
        "params_active": params / 2 if family == "moe" else params,
        "lr": None if lr is None else float(lr),
        "fwd_flops_per_token": 2 * params,
        "train_flops": budget,
        "val_loss": loss,
        "val_bpb": loss / LN2,
        "wall_s": wall,
        "run_id": f"run-{family}-{size}-{seed}",
        "status": status,
    }


def curve(
    family: str,
    budget: float,
    a: float,
    x0: float,
    c0: float,
    *,
    noise: float = 0.0,
    seeds: tuple[int, ...] = (0, 1, 2),
    xs: tuple[float, ...] = XS,
    lr: str | None = "1e-3",
    wall: Callable[[float], float] = lambda x: 100.0,
    rng: np.random.Generator | None = None,
) -> list[dict[str, Any]]:
    """Records of loss = a (x - x0)^2 + c0 (+ Gaussian seed noise) at every size and seed."""
    rng = rng or np.random.default_rng(0)
    return [
        record(
            family, name, x, budget, s, a * (x - x0) ** 2 + c0 + noise * rng.normal(), lr, wall(x)
        )
        for name, x in zip(NAMES, xs, strict=False)
        for s in seeds
    ]


def the(items: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    (hit,) = [i for i in items if all(i[k] == v for k, v in match.items())]
    return hit


# ----------------------------------------------------------------------------- the fit


def test_noiseless_curve_gives_its_exact_optimum_and_zero_spread() -> None:
    sizes = [Size(x, (0.3 * (x - 6.2) ** 2 + 2.0,) * 3) for x in XS]
    opt = optimum(sizes)
    assert opt.status == "interior"
    assert opt.x == pytest.approx(6.2, abs=EXACT)
    assert opt.loss == pytest.approx(2.0, abs=EXACT)
    # identical seeds: every bootstrap draw is the same data, so its std is rounding only
    assert opt.loss_std < EXACT and opt.x_std < EXACT
    assert XS[opt.nearest] == 6.0


def test_noisy_seeds_recover_the_true_optimum() -> None:
    doc = build(curve("dense", 1e13, 0.3, 6.2, 2.0, noise=0.01), CMD, "t")
    opt = the(doc["optima"], family="dense")
    assert opt["status"] == "interior" and opt["size"] == "m"
    # Tolerances: with a = 0.3, sizes 5..7, 3 seeds of noise std 0.01, the fitted x* has a
    # standard error of 0.0076 and loss* of 0.0038 (measured over 300 noise draws); 0.04
    # and 0.02 are ~5 standard errors: the test holds for any noise seed, not just this one.
    assert opt["log10_params"] == pytest.approx(6.2, abs=0.04)
    assert opt["loss"] == pytest.approx(2.0, abs=0.02)
    # both are kept to 6 significant digits: log10_params 6.2xxxx to +-5e-6 is a relative
    # +-1.2e-5 in params (x ln 10), params itself +-5e-7 relative; 3e-5 covers both.
    assert opt["params"] == pytest.approx(10 ** opt["log10_params"], rel=3e-5)
    # The bootstrap std estimates that same standard error (biased low by ~sqrt(2/3) with
    # 3 seeds): it must be of its order, not zero and not the seed noise itself.
    assert 0.002 < opt["log10_params_std"] < 0.03
    assert 0.0005 < opt["loss_std"] < 0.01
    assert opt["n_sizes"] == 5 and opt["n_runs"] == 15


def test_minimum_outside_the_sizes_is_flagged_edge() -> None:
    doc = build(curve("dense", 1e13, 0.3, 8.0, 2.0, noise=0.002), CMD, "t")
    opt = the(doc["optima"], family="dense")
    assert opt["status"] == "edge" and opt["note"] == "edge: widen the sizes"
    assert opt["size"] == "xl"  # the best measured size stands in: the largest
    assert opt["log10_params"] == pytest.approx(7.0, abs=EXACT)


def test_a_curve_that_opens_downward_has_no_minimum() -> None:
    doc = build(curve("dense", 1e13, -0.2, 6.0, 3.0, noise=0.002), CMD, "t")
    opt = the(doc["optima"], family="dense")
    assert opt["status"] == "no-minimum" and opt["note"] == "no minimum"
    assert opt["coeffs"][0] < 0
    assert opt["size"] in ("xs", "xl")  # a downward parabola is lowest at an end


def test_fewer_than_three_sizes_are_not_fitted() -> None:
    doc = build(curve("dense", 1e13, 0.3, 6.0, 2.0, xs=(5.0, 6.0)), CMD, "t")
    opt = the(doc["optima"], family="dense")
    assert opt["status"] == "too-few" and opt["coeffs"] is None
    assert opt["size"] == "s" and opt["n_sizes"] == 2


# ----------------------------------------------------------------------------- LR choice


def test_lr_is_chosen_where_several_were_tried_and_kept_at_every_budget() -> None:
    recs = (
        # a smaller budget added later, at the chosen LR only: it does not choose
        curve("dense", 1e11, 0.3, 6.0, 2.5, lr="3e-3")
        + curve("dense", 1e12, 0.3, 6.0, 2.0, lr="1e-3")
        + curve("dense", 1e12, 0.3, 6.0, 2.1, lr="3e-3")
    )
    doc = build(recs, CMD, "t")
    assert doc["lr_choice"] == {"dense": "1e-3"}


def test_lr_is_chosen_at_the_smallest_budget_and_kept_at_every_budget() -> None:
    recs = (
        curve("dense", 1e12, 0.3, 6.0, 2.0, lr="1e-3")
        + curve("dense", 1e12, 0.3, 6.0, 2.1, lr="3e-3")
        # at the larger budget the other LR is better: it must not matter
        + curve("dense", 1e13, 0.3, 6.0, 1.9, lr="1e-3")
        + curve("dense", 1e13, 0.3, 6.0, 1.5, lr="3e-3")
    )
    doc = build(recs, CMD, "t")
    assert doc["lr_choice"] == {"dense": "1e-3"}
    assert the(doc["optima"], budget=1e13)["loss"] == pytest.approx(1.9, abs=EXACT)
    assert len(doc["lr_table"]) == 2 * 2 * 5  # every (lr, budget, size)
    assert {r["lr"] for r in doc["lr_table"] if r["chosen"]} == {"1e-3"}


# ----------------------------------------------------------------------------- equal wall


def test_equal_wall_uses_dense_optimum_wall_and_finds_the_best_size_within_it() -> None:
    recs = (
        curve("dense", 1e13, 0.3, 6.0, 2.0, wall=lambda x: 100 * x)  # optimum m: W = 600 s
        + curve("moe", 1e13, 0.3, 6.5, 1.9, wall=lambda x: 90 * x)  # l at 585 s is within
        + curve("mod", 1e13, 0.3, 6.0, 1.8, wall=lambda x: 1000.0)  # every size slower
    )
    doc = build(recs, CMD, "t")
    rows = {r["family"]: r for r in doc["equal_wall"]}
    assert {r["wall_limit_s"] for r in rows.values()} == {600.0}
    assert rows["dense"]["size"] == "m"
    assert rows["moe"]["size"] == "l" and rows["moe"]["wall_s_mean"] == 585.0
    assert rows["moe"]["loss_mean"] == pytest.approx(1.9, abs=EXACT)
    assert rows["mod"]["size"] is None


# ----------------------------------------------------------------------------- verdict


def two_budgets(dense_c: tuple[float, float], moe_c: tuple[float, float]) -> dict[str, Any]:
    """dense and moe at budgets 1e12 and 1e13 with optimum losses as given, noiseless."""
    recs = []
    for budget, d, m in zip((1e12, 1e13), dense_c, moe_c, strict=True):
        recs += curve("dense", budget, 0.3, 6.0, d) + curve("moe", budget, 0.3, 6.2, m)
    return build(recs, CMD, "t")


def test_verdict_says_a_family_wins_by_the_numbers() -> None:
    v = two_budgets((2.1, 2.0), (2.1, 1.95))["verdict"]
    best = v["best_dynamic"]
    assert v["budget"] == 1e13 and best["family"] == "moe" and best["outcome"] == "win"
    assert best["diff"] == pytest.approx(-0.05, abs=EXACT)
    assert "moe wins" in v["sentences"][0] and "-0.0500" in v["sentences"][0]
    assert v["moe_vs_dense"]["outcome"] == "win" and "MoE wins." in v["sentences"][1]
    assert v["trends"] == []  # a winner gets no extrapolation


def test_verdict_says_a_family_loses_and_where_its_trend_crosses() -> None:
    # gap +0.10 at 1e12, +0.05 at 1e13: -0.05 per decade, zero at 1e14
    v = two_budgets((2.1, 2.0), (2.2, 2.05))["verdict"]
    best = v["best_dynamic"]
    assert best["outcome"] == "lose" and best["diff"] == pytest.approx(0.05, abs=EXACT)
    assert "moe does not win" in v["sentences"][0]
    assert "MoE loses." in v["sentences"][1]
    (t,) = v["trends"]
    assert t["slope"] == pytest.approx(-0.05, abs=EXACT)
    assert t["crossing_log10_budget"] == pytest.approx(14.0, abs=EXACT)
    assert "cross zero at about 1e+14 training FLOPs" in v["sentences"][2]


def test_verdict_says_when_the_trend_runs_away() -> None:
    v = two_budgets((2.1, 2.0), (2.12, 2.05))["verdict"]  # gap grows: +0.02 -> +0.05
    assert v["trends"][0]["crossing_log10_budget"] is None
    assert "does not trend toward crossing" in v["sentences"][2]


def test_a_small_lead_inside_the_rule_is_not_a_win() -> None:
    v = two_budgets((2.1, 2.0), (2.1, 1.99))["verdict"]  # 0.01 lower: below the margin
    assert v["best_dynamic"]["outcome"] == "tie"
    assert "less than 0.02 nats/byte below dense" in v["sentences"][0]
    assert v["moe_vs_dense"]["outcome"] == "win"  # no margin, zero spread: MoE is lower


def test_without_dense_or_without_any_loss_the_report_says_so(tmp_path: Path) -> None:
    only_moe = write_report(curve("moe", 1e13, 0.3, 6.0, 2.0), tmp_path / "m", CMD, "t").doc
    assert only_moe["verdict"]["sentences"] == ["No dense optimum in the data: no verdict."]
    assert only_moe["equal_wall"] == [] and only_moe["verdict"]["best_dynamic"] is None
    dead = [record("dense", "m", 6.0, 1e13, 0, float("nan"), status="failed")]
    nothing = write_report(dead, tmp_path / "d", CMD, "t")
    assert nothing.doc["optima"] == [] and nothing.doc["method"]["n_failed"] == 1
    assert nothing.png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- files


def study_records() -> list[dict[str, Any]]:
    rng = np.random.default_rng(3)
    recs = []
    for budget, shift in ((1e12, 0.1), (1e13, 0.0)):
        recs += curve(
            "dense", budget, 0.3, 6.0, 2.0 + shift, noise=0.01, rng=rng, wall=lambda x: 100 * x
        )
        recs += curve(
            "moe", budget, 0.25, 6.3, 2.02 + shift, noise=0.01, rng=rng, wall=lambda x: 80 * x
        )
    bad = record("moe", "m", 6.0, 1e13, 9, float("nan"), status="failed")
    return recs + [bad | {"val_bpb": float("nan")}]


def test_write_report_is_byte_identical_and_order_free(tmp_path: Path) -> None:
    recs = study_records()
    one = write_report(recs, tmp_path / "a" / "isoflop", CMD, "isoFLOP study")
    shuffled = list(recs)
    random.Random(0).shuffle(shuffled)
    two = write_report(shuffled, tmp_path / "b" / "isoflop", CMD, "isoFLOP study")
    for ext in (".json", ".md"):
        assert (tmp_path / "a" / f"isoflop{ext}").read_bytes() == (
            tmp_path / "b" / f"isoflop{ext}"
        ).read_bytes()
    assert one.png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert one.doc == two.doc == json.loads(one.json_path.read_text())


def test_failed_runs_are_listed_not_fitted_and_the_page_has_every_part(tmp_path: Path) -> None:
    report = write_report(study_records(), tmp_path / "isoflop", CMD, "isoFLOP study")
    doc, md = report.doc, report.md_path.read_text()
    failed = [r for r in doc["runs"] if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["loss_nats_per_byte"] is None
    assert doc["method"]["n_failed"] == 1 and doc["method"]["n_fitted"] == 60
    assert the(doc["optima"], family="moe", budget=1e13)["n_runs"] == 15
    assert [r["trial"] for r in doc["runs"]] == sorted(r["trial"] for r in doc["runs"])
    for part in (
        "# isoFLOP study",
        CMD,
        "## Method",
        "## Optima per family and budget",
        "## Equal wall-clock",
        "## Learning rates",
        "## Verdict",
        "## Runs",
        "![isoFLOP curves](isoflop.png)",
        "| failed |",
    ):
        assert part in md, part
    for sentence in doc["verdict"]["sentences"]:
        assert f"- {sentence}" in md
    run_rows = [line for line in md.splitlines() if line.startswith("| `family=")]
    assert len(run_rows) == len(doc["runs"])
    # trial ids hold '|': escaped, so every row has the header's 14 cells (15 bars)
    assert {len(re.findall(r"(?<!\\)\|", line)) for line in run_rows} == {15}


def test_one_seed_per_size_leaves_the_spread_unknown() -> None:
    sizes = [Size(x, (0.3 * (x - 6.2) ** 2 + 2.0,)) for x in XS]
    opt = optimum(sizes)
    assert opt.status == "interior" and opt.loss == pytest.approx(2.0, abs=EXACT)
    assert math.isnan(opt.loss_std) and math.isnan(opt.x_std)  # not a spread of 0
