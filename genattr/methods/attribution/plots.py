"""Attribution figures: a grid per query (query + top-k training images per method), Delta L against K.

Built on ``matplotlib.figure.Figure`` (no pyplot state), as ``genattr.tracking.plots``. Latents with other
than 3 channels are shown through their first three channels, each min-max scaled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from genattr.tracking.plots import _save


def to_rgb(x: np.ndarray) -> np.ndarray:
    """(C, H, W) image or latent -> (H, W, 3) in [0, 1]."""
    x = np.asarray(x, dtype=np.float64)[:3]
    if x.shape[0] == 3 and x.min() >= -1.01 and x.max() <= 1.01:
        img = (x + 1) / 2
    else:
        lo, hi = x.min((1, 2), keepdims=True), x.max((1, 2), keepdims=True)
        img = (x - lo) / np.maximum(hi - lo, 1e-8)
    if img.shape[0] < 3:
        img = np.repeat(img[:1], 3, 0)
    return np.clip(img.transpose(1, 2, 0), 0, 1)


def plot_query_grid(
    query: np.ndarray,
    tops: Mapping[str, Sequence[int]],
    train_latents: np.ndarray,
    path: str | Path,
    positives: Sequence[int] = (),
    title: str = "",
) -> Path:
    """Row per method: the query, then its top-k training images (ground truth framed in green)."""
    k = max(len(v) for v in tops.values())
    fig = Figure(figsize=(1.1 * (k + 1), 1.2 * len(tops) + 0.4))
    pos = set(int(p) for p in positives)
    for r, (name, idx) in enumerate(tops.items()):
        ax = fig.add_subplot(len(tops), k + 1, r * (k + 1) + 1)
        ax.imshow(to_rgb(query), interpolation="nearest")
        ax.set_ylabel(name, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        for c, i in enumerate(idx):
            ax = fig.add_subplot(len(tops), k + 1, r * (k + 1) + c + 2)
            ax.imshow(to_rgb(train_latents[int(i)]), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(str(int(i)), fontsize=6)
            if int(i) in pos:
                for s in ax.spines.values():
                    s.set_edgecolor("lime")
                    s.set_linewidth(3)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_delta_vs_k(
    curves: Mapping[str, Mapping[int, tuple[float, float]]],
    path: str | Path,
    ylabel: str = "Delta L (query loss increase)",
) -> Path:
    """Mean +- s.e. of Delta over queries against K, one line per method (random = the floor)."""
    fig = Figure(figsize=(5.0, 3.6))
    ax = fig.add_subplot()
    for name, pts in curves.items():
        ks = sorted(pts)
        m = [pts[k][0] for k in ks]
        se = [pts[k][1] for k in ks]
        ax.errorbar(ks, m, yerr=se, marker="o", capsize=3, label=name, linestyle="--" if name == "random" else "-")
    ax.set_xlabel("K (training images removed)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
