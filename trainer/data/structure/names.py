"""Function names as subtokens, and how a predicted name is scored (code2vec's metric).

A name splits at underscores, at lower-to-upper case changes, at the last capital of a
run of capitals followed by a lower-case letter, and between letters and digits; the
parts are lower-cased and empty parts dropped: ``get_HTTPResponse2`` -> get, http,
response, 2.

Scoring (Alon et al., code2vec): per example, the predicted subtokens against the true
ones as sets, case-insensitive; true positives, false positives and false negatives are
summed over the examples, precision = TP / (TP + FP), recall = TP / (TP + FN), F1 their
harmonic mean (0 where undefined). Exact match: the predicted subtoken sequence equals
the true one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_PARTS = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")


def subtokens(name: str) -> list[str]:
    """The lower-cased parts of an identifier (see the module docstring)."""
    return [p.lower() for chunk in name.split("_") for p in _PARTS.findall(chunk)]


@dataclass(frozen=True)
class NameScore:
    precision: float
    recall: float
    f1: float
    exact: float
    """Fraction of examples whose predicted subtokens equal the true ones, in order."""
    examples: int


def counts(
    predicted: Iterable[Sequence[str]], truth: Iterable[Sequence[str]]
) -> tuple[int, int, int, int, int]:
    """(true positives, false positives, false negatives, exact matches, examples), the
    sums :func:`from_counts` scores (they add over batches and ranks)."""
    tp = fp = fn = exact = n = 0
    for pred, true in zip(predicted, truth, strict=True):
        p, t = {s.lower() for s in pred}, {s.lower() for s in true}
        tp += len(p & t)
        fp += len(p - t)
        fn += len(t - p)
        exact += [s.lower() for s in pred] == [s.lower() for s in true]
        n += 1
    return tp, fp, fn, exact, n


def from_counts(tp: float, fp: float, fn: float, exact: float, n: float) -> NameScore:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return NameScore(precision, recall, f1, exact / n if n else 0.0, int(n))


def score(predicted: Iterable[Sequence[str]], truth: Iterable[Sequence[str]]) -> NameScore:
    """Subtoken precision, recall and F1 summed over examples, and exact match."""
    return from_counts(*counts(predicted, truth))
