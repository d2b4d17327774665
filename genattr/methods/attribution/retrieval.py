"""Retrieval metrics of the scored queries: rankings, ground-truth ranks, AP / mAP, recall@K, per-query grids."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from genattr.data.mscoco import AttributionProtocol
from genattr.methods.attribution.plots import plot_query_grid
from genattr.metrics.attribution import average_precision, mean_se, positive_ranks, ranking, recall_at_k


def retrieval(
    protocol: AttributionProtocol,
    queries: Sequence[int],
    scores: Mapping[str, np.ndarray],
    out: Path,
    *,
    recall_ks: Sequence[int],
    plot_top_k: int,
    plot: bool = True,
) -> tuple[dict[str, Any], dict[str, float], list[Path]]:
    """Per query and method: the top of the ranking, the ground-truth ranks, AP and recall@K, and (``plot``: on
    the main process) a grid plot under ``out/plots``; over the queries with ground truth: mAP (with its s.e.)
    and mean recall@K per method."""
    gt = protocol.ground_truth or {}
    per_query, artifacts = [], []
    aps: dict[str, list[float]] = {m: [] for m in scores}
    recalls: dict[str, dict[int, list[float]]] = {m: {k: [] for k in recall_ks} for m in scores}
    for j, q in enumerate(queries):
        entry: dict[str, Any] = {"query": q, "ground_truth": gt.get(q)}
        if protocol.query_captions:
            entry["prompt"] = protocol.query_captions[q]
        tops = {}
        for m, s in scores.items():
            order = ranking(s[j])
            tops[m] = order[:plot_top_k].tolist()
            row: dict[str, Any] = {"top": order[:10].tolist()}
            if m == "unlearn":
                row["tau"] = {
                    "mean": float(s[j].mean()),
                    "std": float(s[j].std()),
                    "max": float(s[j].max()),
                    "min": float(s[j].min()),
                }
            if q in gt:
                row["gt_ranks"] = positive_ranks(order, gt[q])
                row["ap"] = average_precision(order, gt[q])
                aps[m].append(row["ap"])
                for k in recall_ks:
                    row[f"recall@{k}"] = recall_at_k(order, gt[q], k)
                    recalls[m][k].append(row[f"recall@{k}"])
            entry[m] = row
        per_query.append(entry)
        if plot:
            artifacts.append(
                plot_query_grid(
                    protocol.query_latents[q],
                    tops,
                    protocol.train_latents,
                    out / "plots" / f"query_{q:04d}.png",
                    positives=gt.get(q, ()),
                    title=entry.get("prompt", f"query {q}"),
                )
            )
    results: dict[str, Any] = {"per_query": per_query}
    metrics: dict[str, float] = {}
    if any(aps.values()):
        results["map"] = {m: float(np.mean(v)) for m, v in aps.items()}
        results["map_se"] = {m: mean_se(v)[1] for m, v in aps.items()}
        results["recall"] = {m: {str(k): float(np.mean(v)) for k, v in r.items()} for m, r in recalls.items()}
        results["n_ground_truth_queries"] = len(next(iter(aps.values())))
        for m, v in results["map"].items():
            metrics[f"map/{m}"] = v
            for k in recall_ks:
                metrics[f"recall_at_{k}/{m}"] = results["recall"][m][str(k)]
    return results, metrics, artifacts
