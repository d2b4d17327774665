"""Binary real/fake detection metrics as pure numpy functions (fake = positive class).

AUROC is the Mann-Whitney statistic with average ranks for ties, which is what
scikit-learn's ``roc_auc_score`` and torchmetrics' ``BinaryAUROC`` compute. The
thresholded metrics call a sigmoid probability "fake" when ``score > threshold``
(strictly), as AI-GenBench does twice: torchmetrics' binary stat scores (``preds >
threshold`` on probabilities) during validation, and ``predictions > threshold`` in its
offline ``evaluate_predictions_utils.py``; a score exactly at 0.5 is "real". Undefined
values (a subset with one class only) are ``nan``, never a made-up 0.5.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    boundaries = np.flatnonzero(np.diff(sorted_x)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(x)]])
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    return ranks


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _ranks(scores)
    return float((r[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct threshold, from (0, 0) to (1, 1)."""
    labels = np.asarray(labels).astype(bool)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")
    s, y = np.asarray(scores)[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    tpr = np.r_[0.0, tp / max(1, labels.sum())]
    fpr = np.r_[0.0, fp / max(1, (~labels).sum())]
    return fpr, tpr


def thresholded(labels: np.ndarray, scores: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """Balanced accuracy (TPR + TNR) / 2, precision, recall (= TPR), specificity (= TNR); fake: score > threshold."""
    y = np.asarray(labels).astype(bool)
    pred = np.asarray(scores) > threshold
    tp, fn = int((pred & y).sum()), int((~pred & y).sum())
    tn, fp = int((~pred & ~y).sum()), int((pred & ~y).sum())
    tpr = tp / (tp + fn) if tp + fn else float("nan")
    tnr = tn / (tn + fp) if tn + fp else float("nan")
    return {
        "balanced_accuracy": (tpr + tnr) / 2 if tp + fn and tn + fp else float("nan"),
        "precision": tp / (tp + fp) if tp + fp else float("nan"),
        "recall": tpr,
        "specificity": tnr,
    }


def subset_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    return {
        "auroc": auroc(labels, scores),
        **thresholded(labels, scores, threshold),
        "n_real": int((np.asarray(labels) == 0).sum()),
        "n_fake": int((np.asarray(labels) == 1).sum()),
    }


def benchmark_score(next_aurocs: Sequence[float]) -> float:
    """Mean Next-Period AUROC over windows 0..K-2: the last window has no future and is excluded."""
    values = list(next_aurocs)[:-1]
    if not values:
        return float("nan")
    return float(np.mean(values))


def window_table(per_window: Sequence[Mapping[str, Any]], subset: str, key: str = "auroc") -> list[float]:
    """One metric of one subset across windows, e.g. the Next-Period AUROC timeline."""
    return [float(w[subset][key]) for w in per_window]
