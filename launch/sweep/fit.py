"""The isoFLOP math: seed statistics, the quadratic fit of loss in log10 parameters, its
optimum with a bootstrap uncertainty, and the straight-line trend of a loss gap against
log10 budget.

Pure numpy, no records and no I/O: x is always log10(params_total), a loss is in
nats/byte. Shape legend: S sizes, N seed points (all sizes together), D bootstrap draws.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Bootstrap draws and the RNG seed they start from: fixed, so a report is deterministic.
BOOTSTRAP_DRAWS = 500
BOOTSTRAP_SEED = 0
#: Fewest distinct sizes a quadratic is fitted to (three points fix a parabola).
MIN_SIZES = 3

#: What each optimum status means, as the report writes it.
STATUS_NOTE = {
    "interior": "fitted minimum inside the sizes",
    "edge": "edge: widen the sizes",
    "no-minimum": "no minimum",
    "too-few": "too few sizes (< 3): best measured",
}


@dataclass(frozen=True)
class Size:
    """One measured size of one (family, budget): its x and one loss per seed."""

    x: float
    losses: tuple[float, ...]


@dataclass(frozen=True)
class Optimum:
    """The optimum of one isoFLOP curve. ``nearest`` indexes the measured size nearest to
    ``x`` (the size itself when the optimum is a measured point); ``coeffs`` (a, b, c) of
    loss = a x^2 + b x + c, None when no quadratic was fitted."""

    status: str
    x: float
    loss: float
    x_std: float
    loss_std: float
    nearest: int
    coeffs: tuple[float, float, float] | None


@dataclass(frozen=True)
class Trend:
    """gap = slope * log10(budget) + intercept, fitted to ``n`` budgets."""

    slope: float
    intercept: float
    n: int


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0.0 for a single value)."""
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def _design(x_N: np.ndarray, center: float) -> np.ndarray:
    u = x_N - center
    return np.stack([u * u, u, np.ones_like(u)], axis=1)


def _uncenter(coeffs_3: np.ndarray, center: float) -> tuple[float, float, float]:
    """(a, b, c) in x from the fit in u = x - center."""
    a, b, c = (float(v) for v in coeffs_3)
    return a, b - 2 * a * center, a * center * center - b * center + c


def _interval_min(coeffs_D3: np.ndarray, lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    """(u, value) of each quadratic's minimum over [lo, hi]: the vertex when it opens up
    and lies inside, else the lower end point."""
    a, b, c = coeffs_D3[:, 0], coeffs_D3[:, 1], coeffs_D3[:, 2]
    up = a > 0
    vertex = np.where(up, -b / np.where(up, 2 * a, 1.0), lo)
    cand_DC = np.stack([np.full_like(a, lo), np.full_like(a, hi), np.clip(vertex, lo, hi)], 1)
    val_DC = a[:, None] * cand_DC**2 + b[:, None] * cand_DC + c[:, None]
    pick_D = val_DC.argmin(axis=1)
    rows = np.arange(len(a))
    return cand_DC[rows, pick_D], val_DC[rows, pick_D]


def _resampled(sizes: Sequence[Size], rng: np.random.Generator) -> list[np.ndarray]:
    """Per size, a (D, seeds) array of its losses resampled with replacement."""
    out = []
    for s in sizes:
        losses = np.asarray(s.losses, dtype=float)
        idx = rng.integers(0, len(losses), size=(BOOTSTRAP_DRAWS, len(losses)))
        out.append(losses[idx])
    return out


def _best_measured(sizes: Sequence[Size], status: str, coeffs: tuple | None) -> Optimum:
    """The size with the lowest seed-mean loss; its spread from the same choice made on
    every bootstrap draw."""
    x_S = np.array([s.x for s in sizes])
    means_S = np.array([np.mean(s.losses) for s in sizes])
    best = int(means_S.argmin())
    draws = _resampled(sizes, np.random.default_rng(BOOTSTRAP_SEED))
    means_DS = np.stack([d.mean(axis=1) for d in draws], axis=1)
    pick_D = means_DS.argmin(axis=1)
    return Optimum(
        status=status,
        x=float(x_S[best]),
        loss=float(means_S[best]),
        x_std=float(x_S[pick_D].std()),
        loss_std=float(means_DS.min(axis=1).std()),
        nearest=best,
        coeffs=coeffs,
    )


def optimum(sizes: Sequence[Size]) -> Optimum:
    """:func:`_optimum`, its stds unknown (NaN) when no size has two seeds: resampling a
    single seed per size draws the same data every time, a spread of 0 that says nothing
    about the seeds."""
    opt = _optimum(sizes)
    if all(len(s.losses) < 2 for s in sizes):
        return dataclasses.replace(opt, x_std=math.nan, loss_std=math.nan)
    return opt


def _optimum(sizes: Sequence[Size]) -> Optimum:
    """The optimum of one isoFLOP curve.

    A quadratic in x is least-squares fitted to every seed point. Its vertex is the
    optimum ("interior") when it opens upward and lies within the measured sizes; otherwise
    the best measured size stands in, flagged "edge" (the vertex lies outside the sizes),
    "no-minimum" (a <= 0) or "too-few" (fewer than 3 sizes, nothing fitted). The stds come
    from a bootstrap that resamples each size's seeds: an interior optimum's estimator is
    the fitted quadratic's minimum over the sizes' range, a best-measured one's is the
    lowest seed-mean (with its size's x). ``nearest`` indexes ``sizes`` as given.
    """
    if len({s.x for s in sizes}) < MIN_SIZES:
        return _best_measured(sizes, "too-few", None)
    x_N = np.concatenate([np.full(len(s.losses), s.x) for s in sizes])
    y_N = np.concatenate([np.asarray(s.losses, dtype=float) for s in sizes])
    center = float(x_N.mean())
    pinv_3N = np.linalg.pinv(_design(x_N, center))
    fit_3 = pinv_3N @ y_N
    coeffs = _uncenter(fit_3, center)
    a, b = float(fit_3[0]), float(fit_3[1])
    lo, hi = min(s.x for s in sizes) - center, max(s.x for s in sizes) - center
    if a <= 0:
        return _best_measured(sizes, "no-minimum", coeffs)
    u_star = -b / (2 * a)
    if not lo <= u_star <= hi:
        return _best_measured(sizes, "edge", coeffs)
    x_star = u_star + center
    draws_DN = np.concatenate(_resampled(sizes, np.random.default_rng(BOOTSTRAP_SEED)), axis=1)
    u_D, loss_D = _interval_min(draws_DN @ pinv_3N.T, lo, hi)
    return Optimum(
        status="interior",
        x=x_star,
        loss=float(np.polyval(fit_3, u_star)),
        x_std=float(u_D.std()),
        loss_std=float(loss_D.std()),
        nearest=int(np.abs(np.array([s.x for s in sizes]) - x_star).argmin()),
        coeffs=coeffs,
    )


def linear_trend(log10_budgets: Sequence[float], gaps: Sequence[float]) -> Trend | None:
    """Least-squares line through (log10 budget, gap); None for fewer than 2 budgets."""
    t = np.asarray(log10_budgets, dtype=float)
    if len(set(t.tolist())) < 2:
        return None
    slope, intercept = np.polyfit(t, np.asarray(gaps, dtype=float), 1)
    return Trend(float(slope), float(intercept), len(t))


def crossing(trend: Trend, target: float) -> float | None:
    """log10 budget at which a falling trend reaches ``target`` (the gap is above it and
    must come down); None when the slope does not fall."""
    if not trend.slope < 0 or not math.isfinite(trend.slope):
        return None
    return (target - trend.intercept) / trend.slope
