"""Continual-forgetting metrics (``specs/gslora.md`` section 4) as pure functions over arrays.

Accuracies are pooled over the images of a class set (not averaged per class), from
per-class ``correct`` / ``total`` counts of one pass over the test split:
Acc_f on the current task's forgotten classes, Acc_r on the remaining ones, Acc_o on
the classes forgotten in earlier tasks, Acc_m on the missing classes (no training data;
they are also remaining classes). H-mean combines the drop of Acc_f with Acc_r.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pooled_accuracy(correct: np.ndarray, total: np.ndarray, classes: Sequence[int]) -> float:
    """Top-1 accuracy (%) over every test image of ``classes``; NaN for an empty set."""
    idx = np.asarray(list(classes), dtype=np.int64)
    n = float(np.sum(total[idx])) if len(idx) else 0.0
    return float("nan") if n == 0 else 100.0 * float(np.sum(correct[idx])) / n


def h_mean(acc_r: float, acc_f_before: float, acc_f_after: float) -> float:
    """H = 2 * Drop * Acc_r / (Drop + Acc_r), Drop = Acc_f before - after, clipped at 0.

    A negative drop (the method *raised* the forgotten accuracy) counts as no forgetting,
    H = 0, instead of a meaningless negative harmonic mean.
    """
    drop = max(0.0, float(acc_f_before) - float(acc_f_after))
    if drop + acc_r <= 0:
        return 0.0
    return 2.0 * drop * float(acc_r) / (drop + float(acc_r))


def zero_group_ratio(norms: Sequence[float], tol: float) -> float:
    """Share of LoRA groups whose norm is below ``tol`` (the paper's "zero group ratio")."""
    arr = np.asarray(list(norms), dtype=np.float64)
    return float(np.mean(arr < tol)) if len(arr) else 0.0
