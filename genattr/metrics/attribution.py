"""Attribution metrics: retrieval of known sources (Recall@K, AP / mAP) and the leave-K-out gold standard.

Recall@K and AP follow ``GenDataAttribution/eval.py`` (the AbC benchmark): Recall@K = |positives in the top K|
/ |positives|; AP = mean over positives of (how many positives up to it) / (its 1-based rank), over the full
ranking. Leave-K-out figures (Delta L, Delta G) are graded against the distribution of random-K removals:
per query, a method's gain over the mean random removal, then mean +- s.e. over queries (paired).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def ranking(scores: np.ndarray) -> np.ndarray:
    """Training indices from most to least attributed (stable, so ties keep index order)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")


def positive_ranks(order: np.ndarray, positives: Iterable[int]) -> list[int]:
    """0-based positions of the positives in ``order`` (sorted)."""
    where = np.empty(len(order), dtype=np.int64)
    where[order] = np.arange(len(order))
    return sorted(int(where[p]) for p in positives)


def recall_at_k(order: np.ndarray, positives: Sequence[int], k: int) -> float:
    pos = set(int(p) for p in positives)
    if not pos:
        raise ValueError("recall@k needs at least one positive")
    return len(pos.intersection(int(i) for i in order[:k])) / len(pos)


def average_precision(order: np.ndarray, positives: Sequence[int]) -> float:
    ranks = positive_ranks(order, positives)
    if not ranks:
        raise ValueError("AP needs at least one positive")
    return float(np.mean([(i + 1) / (r + 1) for i, r in enumerate(ranks)]))


def mean_se(values: Iterable[float]) -> tuple[float, float]:
    """Mean and standard error (0 for a single value)."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    se = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else 0.0
    return float(v.mean()), se


def grade_against_random(method: Sequence[float], random: Sequence[Sequence[float]]) -> dict[str, float]:
    """Paired grading of per-query values against per-query random-K draws.

    ``method[q]`` is a method's Delta for query q, ``random[q]`` the Deltas of the random-K removals for
    query q (>= 1 seeds). Returns the method's mean +- s.e., the random floor's mean +- s.e., the paired
    gain (method - mean random) mean +- s.e., its z = mean / s.e., and the fraction of queries where the
    method beats every random draw.
    """
    m = np.asarray(method, dtype=np.float64)
    r = [np.asarray(x, dtype=np.float64) for x in random]
    if len(r) != len(m) or any(x.size == 0 for x in r):
        raise ValueError("every query needs a method value and at least one random draw")
    floor = np.array([x.mean() for x in r])
    gain = m - floor
    gm, gse = mean_se(gain)
    mm, mse = mean_se(m)
    fm, fse = mean_se(floor)
    return {
        "mean": mm,
        "se": mse,
        "floor_mean": fm,
        "floor_se": fse,
        "gain_mean": gm,
        "gain_se": gse,
        "gain_z": gm / gse if gse > 0 else (float("inf") if gm > 0 else 0.0),
        "beats_all_random": float(np.mean([mv > x.max() for mv, x in zip(m, r, strict=False)])),
    }


def clears_floor(grade: dict[str, float], z: float = 2.0) -> bool:
    """A method clears the random floor when its paired gain is ``z`` standard errors above zero."""
    return bool(grade["gain_mean"] > 0 and grade["gain_z"] >= z)
