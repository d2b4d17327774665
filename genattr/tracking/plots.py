"""Figures for reports and MLflow: accuracy matrices, stage curves, ROC curves, window heatmaps.

Figures are built with ``matplotlib.figure.Figure`` directly, never ``pyplot``, so
nothing is registered in pyplot's global figure list (no leaks over 12-task sweeps,
no GUI backend needed on headless nodes) and the Agg canvas is explicit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _save(fig: Figure, path: str | Path) -> Path:
    """Render through an explicit Agg canvas and create the parent folder."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out, dpi=120, bbox_inches="tight")
    return out


def plot_accuracy_matrix(
    r: np.ndarray,
    task_names: Sequence[str],
    path: str | Path,
    title: str = "Accuracy matrix",
) -> Path:
    """Heatmap of ``R`` (rows = evaluated task, cols = after training task), values annotated.

    Unseen cells (below the diagonal) are left blank rather than drawn as 0%, which
    would read as catastrophic forgetting.
    """
    m = np.asarray(r, dtype=np.float64)
    n = len(task_names)
    if m.shape != (n, n):
        raise ValueError(f"matrix shape {m.shape} does not match {n} task names")
    masked = np.ma.masked_where(np.tril(np.ones_like(m, dtype=bool), k=-1), m)
    size = max(4.0, 0.7 * n + 2.0)
    fig = Figure(figsize=(size + 1.0, size))
    ax = fig.add_subplot()
    im = ax.imshow(masked, vmin=0.0, vmax=100.0, cmap="viridis")
    fig.colorbar(im, ax=ax, label="accuracy (%)")
    for i in range(n):
        for j in range(i, n):
            color = "black" if m[i, j] > 60 else "white"
            ax.text(
                j,
                i,
                f"{m[i, j]:.1f}",
                ha="center",
                va="center",
                fontsize=8,
                color=color,
            )
    ax.set_xticks(range(n), labels=list(task_names), rotation=45, ha="right")
    ax.set_yticks(range(n), labels=list(task_names))
    ax.set_xlabel("after training task")
    ax.set_ylabel("evaluated task")
    ax.set_title(title)
    return _save(fig, path)


def plot_stage_curve(
    curves: Mapping[str, Sequence[float]],
    task_names: Sequence[str],
    path: str | Path,
    ylabel: str = "average accuracy (%)",
    title: str | None = None,
) -> Path:
    """One line per curve (e.g. per method or seed) over training stages.

    Curves may be shorter than ``task_names`` so a partially finished run can be
    plotted next to complete ones.
    """
    n = len(task_names)
    fig = Figure(figsize=(max(5.0, 0.6 * n + 2.0), 4.0))
    ax = fig.add_subplot()
    for label, values in curves.items():
        if len(values) > n:
            raise ValueError(f"curve {label!r} has {len(values)} points for {n} stages")
        ax.plot(range(len(values)), list(values), marker="o", label=label)
    ax.set_xticks(range(n), labels=list(task_names), rotation=45, ha="right")
    ax.set_xlabel("after training task")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend()
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_roc_curves(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | Path, title: str = "ROC"
) -> Path:
    """One ROC line per entry (label -> (FPR, TPR)), with the chance diagonal."""
    fig = Figure(figsize=(5.0, 5.0))
    ax = fig.add_subplot()
    for label, (fpr, tpr) in curves.items():
        ax.plot(fpr, tpr, label=label)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize="small")
    return _save(fig, path)


def plot_window_heatmap(
    values: np.ndarray,
    row_names: Sequence[str],
    col_names: Sequence[str],
    path: str | Path,
    title: str = "AUROC per generator",
    col_groups: Sequence[int] | None = None,
) -> Path:
    """Heatmap rows = after window k, cols = generators (chronological), values in [0, 1].

    ``col_groups`` gives each column's window so window borders can be drawn.
    """
    m = np.asarray(values, dtype=np.float64)
    fig = Figure(figsize=(max(6.0, 0.45 * len(col_names) + 2.5), max(3.0, 0.45 * len(row_names) + 2.0)))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(m), vmin=0.5, vmax=1.0, cmap="viridis", aspect="auto")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if m.size <= 400:
        for (i, j), v in np.ndenumerate(m):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.8 else "k")
    if col_groups is not None:
        for j in range(1, len(col_groups)):
            if col_groups[j] != col_groups[j - 1]:
                ax.axvline(j - 0.5, color="white", lw=1.5)
    ax.set_xticks(range(len(col_names)), labels=list(col_names), rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(row_names)), labels=list(row_names))
    ax.set_xlabel("generator (release order)")
    ax.set_ylabel("after training window")
    ax.set_title(title)
    return _save(fig, path)
