"""Forgetting figures: accuracy curves over tasks and LoRA group norms per task."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from genattr.tracking.plots import _save


def plot_accuracy_curves(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Acc_f / Acc_r / Acc_o (and Acc_m) after each task, with Acc_f and Acc_r at task start dashed."""
    names = [r["name"] for r in rows]
    fig = Figure(figsize=(max(5.0, 0.8 * len(rows) + 3.0), 4.0))
    ax = fig.add_subplot()
    x = np.arange(len(rows))
    for key, label, style in (
        ("acc_f_start", "Acc_f (task start)", "--"),
        ("acc_r_start", "Acc_r (task start)", "--"),
        ("acc_f", "Acc_f", "-"),
        ("acc_r", "Acc_r", "-"),
        ("acc_o", "Acc_o", "-"),
        ("acc_m", "Acc_m", "-"),
        ("h", "H-mean", ":"),
    ):
        vals = [r.get(key) for r in rows]
        if all(v is None for v in vals):
            continue
        ax.plot(x, [np.nan if v is None else v for v in vals], style, marker="o", label=label)
    ax.set_xticks(x, labels=names)
    ax.set_ylim(-2, 102)
    ax.set_xlabel("after task")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_group_norms(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """One bar group per task: the L2 norm of each block's LoRA parameters (log scale)."""
    norms = np.asarray([r["group_norms"] for r in rows], dtype=np.float64)
    n_tasks, n_blocks = norms.shape
    fig = Figure(figsize=(max(5.0, 1.2 * n_tasks + 3.0), 4.0))
    ax = fig.add_subplot()
    width = 0.8 / n_blocks
    for b in range(n_blocks):
        ax.bar(np.arange(n_tasks) + b * width, np.maximum(norms[:, b], 1e-8), width, label=f"block {b}")
    ax.set_yscale("log")
    ax.set_xticks(np.arange(n_tasks) + 0.4 - width / 2, labels=[r["name"] for r in rows])
    ax.set_xlabel("task")
    ax.set_ylabel("group L2 norm of LoRA params")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)
