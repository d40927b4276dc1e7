"""Margins from ties, for tests that compare two code paths across a decision boundary.

Two code paths that compute the same math (a batched forward and incremental decoding, one
process and four ranks, a kernel and its reference) agree only to float rounding: other
GEMM shapes and thread counts pick other kernels and reduction orders, and which ones is a
property of the CPU (``ATEN_CPU_CAPABILITY``, MKL's dispatch) as much as of the code. A
decision on a score (a threshold, a top-k or capacity cut, a predictor's sign) then agrees
between the paths only when the score is clear of the boundary by more than that rounding.
A test that compares the paths must build that clearance into its data, and check it,
rather than hope that no data point sits on a tie on the CPU it happens to run on.

``DECISION_MARGIN``: fp32 scores of this suite's tiny models (softmax probabilities,
router logits of order 1) differ between paths by at most ~1e-6 (a few ulps of values
near 1, accumulated over a handful of layers). 1e-4 is a hundred times that, and small
enough that random data of a few hundred scores has such gaps to choose from.

Shape legend: N any number of scores, R rows, E choices per row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

DECISION_MARGIN = 1e-4


def threshold_gap(scores_N: torch.Tensor, threshold: float) -> float:
    """Distance of the score nearest to ``threshold`` (inf for no scores)."""
    if scores_N.numel() == 0:
        return float("inf")
    return float((scores_N.detach().double() - threshold).abs().min())


def topk_gap(scores_RE: torch.Tensor, k: int) -> float:
    """Smallest gap, over rows, between a row's k-th and (k+1)-th largest score: how far the
    top-k cut of every row is from a tie (inf when k covers the whole row)."""
    if k >= scores_RE.shape[-1] or scores_RE.numel() == 0:
        return float("inf")
    top = scores_RE.detach().double().topk(k + 1, dim=-1).values
    return float((top[..., k - 1] - top[..., k]).min())


def assert_clear(gap: float, what: str, margin: float = DECISION_MARGIN) -> None:
    """Fail with a message that says the test data, not the code, sits on a tie."""
    assert gap > margin, (
        f"test data sits within {gap:.3g} of a decision boundary ({what}); choose data with "
        f"a margin above {margin:g}"
    )


def clear_threshold(
    scores_N: torch.Tensor,
    check: Callable[[float], float] | None = None,
    margin: float = DECISION_MARGIN,
    quantile: float = 0.5,
) -> float:
    """A threshold near ``quantile`` of ``scores_N`` that lies midway in a gap between two
    neighbouring scores wider than ``2 * margin`` (so about that share of the scores is
    above it, and none within ``margin``). ``check(threshold)`` may measure the gap of
    further scores the threshold produces (e.g. the later exits of a causal pass); the
    nearest candidate whose check is also above ``margin`` is taken."""
    s = scores_N.detach().double().flatten().sort().values
    mids = (s[1:] + s[:-1]) / 2
    wide = ((s[1:] - s[:-1]) / 2 > margin).nonzero().flatten().tolist()
    target = quantile * (len(s) - 1)
    for i in sorted(wide, key=lambda i: abs(i + 0.5 - target)):
        thr = float(mids[i])
        if check is None or check(thr) > margin:
            return thr
    raise AssertionError(f"no threshold with a margin of {margin:g} in these {len(s)} scores")


def min_gap(gaps: Iterable[float]) -> float:
    return min(gaps, default=float("inf"))
