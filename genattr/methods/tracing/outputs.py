"""Model-tracer outputs: the submission CSV, the confusion matrix PNG and per-family score histograms."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from genattr.data.rarvar import LABELS
from genattr.utils.errors import DataError


def write_submission(path: Path, names: Sequence[str], labels: Sequence[str]) -> Path:
    """``image_name,label``, one row per test file, in file-name order; labels must be the 9 task labels."""
    if len(names) != len(labels):
        raise ValueError(f"{len(names)} test files but {len(labels)} labels")
    bad = sorted({lab for lab in labels if lab not in LABELS})
    if bad:
        raise ValueError(f"labels {bad} are not task labels {LABELS}")
    if len(set(names)) != len(names):
        raise DataError("test file names are not unique; the submission needs one row per file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_name", "label"])
        for n, lab in sorted(zip(names, labels, strict=True)):
            w.writerow([n, lab])
    tmp.replace(path)
    return path


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def plot_confusion(matrix: np.ndarray, path: Path, title: str, labels: Sequence[str] = LABELS) -> Path:
    """Row-normalised confusion matrix (rows = true), counts annotated."""
    m = np.asarray(matrix, dtype=np.float64)
    rows = np.maximum(m.sum(1, keepdims=True), 1)
    fig = Figure(figsize=(7.5, 6.5))
    ax = fig.add_subplot()
    im = ax.imshow(m / rows, vmin=0, vmax=1, cmap="viridis")
    fig.colorbar(im, ax=ax, label="share of the true label")
    for i in range(len(labels)):
        for j in range(len(labels)):
            if m[i, j]:
                ax.text(
                    j,
                    i,
                    int(m[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if m[i, j] / rows[i, 0] < 0.6 else "black",
                )
    ax.set_xticks(range(len(labels)), labels=list(labels), rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels=list(labels))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _save(fig, path)


def plot_histograms(
    scores: Mapping[str, np.ndarray], groups: Sequence[str], path: Path, title: str, xlabel: str
) -> Path:
    """One histogram per group label of ``scores[label]`` (e.g. a family's z-score by true label group)."""
    fig = Figure(figsize=(6.5, 4))
    ax = fig.add_subplot()
    finite = [v[np.isfinite(v)] for v in scores.values() if len(v)]
    if finite:
        lo, hi = min(float(v.min()) for v in finite), max(float(v.max()) for v in finite)
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 30)
        for g in groups:
            v = scores.get(g)
            if v is not None and len(v):
                ax.hist(v[np.isfinite(v)], bins=bins, alpha=0.5, label=f"{g} (n={len(v)})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)
