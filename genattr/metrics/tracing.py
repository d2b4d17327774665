"""Model-tracer metrics: 9-class accuracy (the leaderboard score), family accuracy, variant accuracy given the
family, outlier precision / recall and the confusion matrix. Pure functions over label strings: the task's
label set and its label -> family map are arguments (the loader owns them), so metrics import nothing above them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def confusion(true: Sequence[str], pred: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    """Counts ``[len(labels), len(labels)]``; rows = true label, columns = predicted label."""
    index = {lab: i for i, lab in enumerate(labels)}
    m = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for t, p in zip(true, pred, strict=True):
        m[index[t], index[p]] += 1
    return m


def tracing_metrics(
    true: Sequence[str], pred: Sequence[str], *, family_of: Mapping[str, str], outlier: str
) -> dict[str, float]:
    """Percentages: ``accuracy`` (9-class), ``family_accuracy`` (var / rar / outlier), ``family_accuracy_generated``
    (generated images only: predicted family = true family, an ``outlier`` call counts as wrong), ``variant_accuracy``
    (exact label among generated images whose family was predicted right), ``outlier_precision`` /
    ``outlier_recall`` (outlier as the positive class; 0 when undefined) and the counts behind them. ``family_of``
    maps every label to its family (``outlier`` to itself)."""
    t = np.asarray(list(true), dtype=object)
    p = np.asarray(list(pred), dtype=object)
    if t.shape != p.shape:
        raise ValueError(f"{len(t)} true labels but {len(p)} predictions")
    n = len(t)
    tf = np.asarray([family_of[x] for x in t], dtype=object)
    pf = np.asarray([family_of[x] for x in p], dtype=object)
    fam_ok = (tf == pf) & (tf != outlier)
    pos, called = t == outlier, p == outlier
    tp = int(np.sum(pos & called))
    return {
        "accuracy": 100.0 * float(np.mean(t == p)) if n else 0.0,
        "family_accuracy": 100.0 * float(np.mean(tf == pf)) if n else 0.0,
        "family_accuracy_generated": 100.0 * float(np.mean(fam_ok[tf != outlier])) if np.any(tf != outlier) else 0.0,
        "variant_accuracy": 100.0 * float(np.mean(t[fam_ok] == p[fam_ok])) if fam_ok.any() else 0.0,
        "outlier_precision": 100.0 * tp / int(called.sum()) if called.any() else 0.0,
        "outlier_recall": 100.0 * tp / int(pos.sum()) if pos.any() else 0.0,
        "n": float(n),
        "n_outliers": float(pos.sum()),
        "n_family_correct_generated": float(fam_ok.sum()),
    }
