"""Class-incremental metrics for real/fake attribution benchmarks (CDDB, LoRAX).

Labels follow the LoRAX/CDDB convention: task ``i`` owns class ``2i`` (real) and
``2i + 1`` (fake from task ``i``'s generator). Predictions are argmaxes over all
classes seen so far, so "which task" and "real or fake" are decided jointly.

The accuracy matrix ``R`` has rows = evaluated task and columns = training stage:
``R[i, j]`` is the accuracy (percent) on task ``i`` after training task ``j``; it
is upper-triangular, with 0 for tasks not yet seen (``i > j``). All summaries are
plain Python floats/lists so they can go straight to MLflow or JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

Rule = Literal["multi_real", "binary", "exact"]


def _as_int_pair(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate and coerce labels; mismatched lengths would silently broadcast."""
    p = np.asarray(pred)
    y = np.asarray(target)
    if p.shape != y.shape or p.ndim != 1:
        raise ValueError(f"pred and target must be 1-D of equal length, got {p.shape} and {y.shape}")
    ints = np.issubdtype(p.dtype, np.integer) and np.issubdtype(y.dtype, np.integer)
    if not ints and (np.any(p != np.round(p)) or np.any(y != np.round(y))):
        raise ValueError("pred and target must hold integer class indices")
    return p.astype(np.int64), y.astype(np.int64)


def multi_real_correct(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """LoRAX's multi-real correctness: ``p*(p%2) == y*(y%2)``.

    Real images of different tasks are indistinguishable by construction (all are
    "real"), so any real-to-real confusion counts as correct, whereas a fake must be
    attributed to its own generator and real/fake mix-ups are always wrong.
    """
    p, y = _as_int_pair(pred, target)
    return (p * (p % 2)) == (y * (y % 2))


def binary_correct(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Real-vs-fake correctness (``p%2 == y%2``): the deepfake-detection view of the task."""
    p, y = _as_int_pair(pred, target)
    return (p % 2) == (y % 2)


def _correct(pred: np.ndarray, target: np.ndarray, rule: Rule) -> np.ndarray:
    """Dispatch on the correctness rule so callers name it once, in config."""
    if rule == "multi_real":
        return multi_real_correct(pred, target)
    if rule == "binary":
        return binary_correct(pred, target)
    if rule == "exact":
        p, y = _as_int_pair(pred, target)
        return p == y
    raise ValueError(f"unknown accuracy rule {rule!r}; use 'multi_real', 'binary' or 'exact'")


def per_task_accuracy(
    pred: np.ndarray,
    target: np.ndarray,
    task_ids: np.ndarray,
    n_tasks: int,
    rule: Rule = "multi_real",
) -> np.ndarray:
    """Accuracy in percent for each task ``0..n_tasks-1`` (LoRAX ``acc_per_task``).

    Unweighted per task, because the paper's AAF averages tasks, not samples. A
    task without samples raises instead of returning NaN: it means the evaluation
    set was built wrongly, and a NaN would silently poison every summary.
    """
    correct = _correct(pred, target, rule)
    tids = np.asarray(task_ids)
    if tids.shape != correct.shape:
        raise ValueError(f"task_ids shape {tids.shape} does not match pred shape {correct.shape}")
    if n_tasks < 1:
        raise ValueError(f"n_tasks must be >= 1, got {n_tasks}")
    tids = tids.astype(np.int64)
    if tids.size and (tids.min() < 0 or tids.max() >= n_tasks):
        raise ValueError(f"task_ids must lie in [0, {n_tasks}), got [{tids.min()}, {tids.max()}]")
    counts = np.bincount(tids, minlength=n_tasks)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise ValueError(f"no evaluation samples for task(s) {empty.tolist()}")
    hits = np.bincount(tids, weights=correct.astype(np.float64), minlength=n_tasks)
    return 100.0 * hits / counts


def build_accuracy_matrix(stage_accuracies: Sequence[Sequence[float]]) -> np.ndarray:
    """Assemble ``R`` from per-stage accuracy lists (LoRAX ``construct_matrix``).

    ``stage_accuracies[j]`` holds the accuracies of tasks ``0..j`` after stage
    ``j``, which is exactly what an end-of-task evaluation produces; unseen
    entries are filled with 0 as in the original.
    """
    n = len(stage_accuracies)
    if n == 0:
        raise ValueError("need at least one stage")
    r = np.zeros((n, n), dtype=np.float64)
    for j, accs in enumerate(stage_accuracies):
        if len(accs) != j + 1:
            raise ValueError(f"stage {j} must report {j + 1} task accuracies, got {len(accs)}")
        r[: j + 1, j] = np.asarray(accs, dtype=np.float64)
    return r


def _check_matrix(r: np.ndarray) -> np.ndarray:
    """Reject malformed matrices early: a transposed or ragged R gives plausible garbage."""
    m = np.asarray(r, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be square T x T with T >= 1, got shape {m.shape}")
    if not np.all(np.isfinite(np.triu(m))):
        raise ValueError("accuracy matrix has non-finite entries on or above the diagonal")
    return m


def stage_average_curve(r: np.ndarray) -> list[float]:
    """Mean accuracy over seen tasks after each stage (``mean_{i<=j} R[i, j]``)."""
    m = _check_matrix(r)
    return [float(m[: j + 1, j].mean()) for j in range(m.shape[0])]


def average_incremental_accuracy(r: np.ndarray) -> float:
    """AA: mean of the stage-average curve (the LoRAX table's "AA", inferred)."""
    return float(np.mean(stage_average_curve(r)))


def final_average_accuracy(r: np.ndarray) -> float:
    """AAF: unweighted mean over tasks of the last column (LoRAX ``avg_acc_final``)."""
    m = _check_matrix(r)
    return float(m[:, -1].mean())


def backward_transfer(r: np.ndarray) -> float:
    """BWT = mean over all but the last task of (final accuracy - just-learned accuracy).

    Defined as 0.0 for a single task, where there is nothing to forget.
    """
    m = _check_matrix(r)
    t = m.shape[0]
    if t == 1:
        return 0.0
    idx = np.arange(t - 1)
    return float(np.sum(m[idx, t - 1] - m[idx, idx]) / (t - 1))


def forgetting(r: np.ndarray) -> float:
    """Forgetting as LoRAX defines it: ``-BWT`` (not the max-drop definition of Chaudhry et al.)."""
    return 0.0 - backward_transfer(r)  # avoids a confusing -0.0 for T == 1


def summarize(r: np.ndarray) -> dict[str, float | list[float]]:
    """All headline numbers at once, ready for ``final/*`` MLflow metrics and JSON."""
    return {
        "aa": average_incremental_accuracy(r),
        "aaf": final_average_accuracy(r),
        "bwt": backward_transfer(r),
        "forgetting": forgetting(r),
        "stage_avg": stage_average_curve(r),
    }
