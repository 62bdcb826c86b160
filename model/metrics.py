"""Diagnostic metrics, one definition each: accuracy, top-k, per-class precision and recall, balanced
accuracy, the confusion matrix, bootstrap confidence intervals, calibration error and Fleiss' kappa.
Pure Python + numpy, below every other layer of the library: the evaluation harness and the
differential head both measure with these.

A prediction is a ranked list of class names (best first, possibly empty: no diagnosis found).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np


@dataclass(frozen=True)
class Case:
    label: str
    ranked: tuple[str, ...]  # predicted classes, best first; () when none was found
    fitzpatrick: int | None = None

    @property
    def top1(self) -> str | None:
        return self.ranked[0] if self.ranked else None


def accuracy(cases: Sequence[Case]) -> float:
    return float(np.mean([c.top1 == c.label for c in cases])) if cases else float("nan")


def top_k(cases: Sequence[Case], k: int = 3) -> float:
    return float(np.mean([c.label in c.ranked[:k] for c in cases])) if cases else float("nan")


def per_class(cases: Sequence[Case], classes: Sequence[str]) -> dict[str, dict[str, float | int]]:
    """Precision, recall and support per class (precision is NaN for a class never predicted)."""
    out = {}
    for cls in classes:
        tp = sum(c.label == cls and c.top1 == cls for c in cases)
        predicted = sum(c.top1 == cls for c in cases)
        support = sum(c.label == cls for c in cases)
        out[cls] = {"precision": tp / predicted if predicted else float("nan"),
                    "recall": tp / support if support else float("nan"), "support": support}
    return out


def balanced_accuracy(cases: Sequence[Case]) -> float:
    """Mean recall over the classes present among the labels."""
    classes = sorted({c.label for c in cases})
    recalls = [per_class(cases, [cls])[cls]["recall"] for cls in classes]
    return float(np.mean(recalls)) if recalls else float("nan")


def confusion(cases: Sequence[Case], classes: Sequence[str]) -> tuple[list[str], list[list[int]]]:
    """Rows: true class; columns: predicted class, plus a last 'none' column for no diagnosis."""
    columns = list(classes) + ["none"]
    index = {c: i for i, c in enumerate(columns)}
    matrix = [[0] * len(columns) for _ in classes]
    for case in cases:
        predicted = case.top1 if case.top1 in index else "none"
        matrix[list(classes).index(case.label)][index[predicted]] += 1
    return columns, matrix


def bootstrap_ci(cases: Sequence, metric: Callable[[Sequence], float], n: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap over cases."""
    if not cases:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n):
        sample = [cases[i] for i in rng.integers(0, len(cases), len(cases))]
        value = metric(sample)
        if not np.isnan(value):
            values.append(value)
    low, high = np.percentile(values, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return float(low), float(high)


def fleiss_kappa(ratings: np.ndarray) -> float:
    """Fleiss' kappa for `ratings` of shape (subjects, categories): how many raters chose each category.
    Every subject must have the same number of raters."""
    ratings = np.asarray(ratings, dtype=float)
    raters = ratings.sum(axis=1)
    if not np.allclose(raters, raters[0]) or raters[0] < 2:
        raise ValueError("Fleiss' kappa needs the same number (at least 2) of raters for every subject")
    n = raters[0]
    p_j = ratings.sum(axis=0) / ratings.sum()  # share of all ratings per category
    p_i = ((ratings ** 2).sum(axis=1) - n) / (n * (n - 1))  # agreement within each subject
    p_bar, p_e = p_i.mean(), (p_j ** 2).sum()
    if np.isclose(p_e, 1.0):
        return 1.0 if np.isclose(p_bar, 1.0) else 0.0
    return float((p_bar - p_e) / (1 - p_e))


def calibration_error(confidence: Sequence[float], correct: Sequence[float], bins: int = 10) -> float:
    """Expected calibration error: over equal-width bins of each case's top confidence, the gap
    between confidence and how often the top answer was right (`correct`: 1.0 or 0.0), weighted."""
    confidence, correct = np.asarray(confidence, dtype=float), np.asarray(correct, dtype=float)
    total = 0.0
    for i in range(bins):
        inside = (confidence > i / bins) & (confidence <= (i + 1) / bins)
        if inside.any():
            total += inside.mean() * abs(confidence[inside].mean() - correct[inside].mean())
    return float(total)
