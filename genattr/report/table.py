"""Aggregate runs into the ablation table: one row per (method, data), mean ± std over seeds.

Only FINISHED runs enter the means (a failed or killed seed would bias them); how many runs were
left out is a column, so a missing seed is visible instead of silently shrinking n.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.entities import Run

#: Metrics reported when none are named: the end-of-run summaries every method logs.
DEFAULT_PREFIXES = ("final/",)


@dataclass
class Group:
    method: str
    data: str
    seeds: list[str] = field(default_factory=list)
    values: dict[str, list[float]] = field(default_factory=dict)
    not_finished: int = 0


def default_metrics(runs: Iterable[Run]) -> list[str]:
    keys = {k for run in runs for k in run.data.metrics if k.startswith(DEFAULT_PREFIXES)}
    return sorted(keys)


def group_runs(runs: Iterable[Run], metrics: Sequence[str]) -> list[Group]:
    groups: dict[tuple[str, str], Group] = {}
    for run in runs:
        tags = run.data.tags
        key = (tags.get("method", "?"), tags.get("data", "?"))
        group = groups.setdefault(key, Group(*key))
        if run.info.status != "FINISHED":
            group.not_finished += 1
            continue
        group.seeds.append(tags.get("seed", "?"))
        for metric in metrics:
            if metric in run.data.metrics:
                group.values.setdefault(metric, []).append(float(run.data.metrics[metric]))
    return [groups[k] for k in sorted(groups)]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single seed)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def _cell(values: Sequence[float] | None) -> str:
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{mean:.2f} ± {std:.2f}"


def to_markdown(groups: Sequence[Group], metrics: Sequence[str], title: str) -> str:
    header = ["method", "data", "n", *metrics, "not finished"]
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for g in groups:
        cells = [g.method, g.data, str(len(g.seeds)), *(_cell(g.values.get(m)) for m in metrics), str(g.not_finished)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Mean ± sample standard deviation over seeds; only FINISHED runs are averaged."]
    return "\n".join(lines) + "\n"


def to_csv(groups: Sequence[Group], metrics: Sequence[str], path: Path) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            ["method", "data", "n", "seeds", *(f"{m} {s}" for m in metrics for s in ("mean", "std")), "not_finished"]
        )
        for g in groups:
            row: list[object] = [g.method, g.data, len(g.seeds), " ".join(sorted(g.seeds))]
            for metric in metrics:
                values = g.values.get(metric)
                row += list(mean_std(values)) if values else ["", ""]
            writer.writerow([*row, g.not_finished])
    return path
