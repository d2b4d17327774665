"""Continual-learning figures (accuracy matrix, per-stage curves) for reports and MLflow.

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
