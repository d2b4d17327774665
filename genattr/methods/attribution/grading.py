"""Grading the leave-K-out retrains: every method against the random-K floor, the positive control, head to head.

Pure functions of the measured jobs (``{"<kind>|<who>|<k>": {"dl": [...], "dg": [...], ...}}``, one value per
evaluated query), so a resumed evaluation grades exactly what its checkpoints hold.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from genattr.methods.attribution.plots import plot_delta_vs_k
from genattr.metrics.attribution import clears_floor, grade_against_random, mean_se

log = logging.getLogger(__name__)


def grade(
    done: Mapping[str, Mapping[str, Any]],
    eval_q: Sequence[int],
    ks: Sequence[int],
    methods: Sequence[str],
    oracle: bool,
    gt: Mapping[int, Sequence[int]],
    same: bool,
    trained: int,
    out: Path,
    plot: bool = True,
) -> tuple[dict[str, Any], dict[str, float], list[Path]]:
    """Grade every method against the random floor per K on Delta L, Delta G MSE and (if measured) CLIP.

    The CLIP similarity falls when a regeneration changes, so it is graded on its negation: every gain,
    z and pairwise difference below means "changed the query more" (for ``dg_clip``: lower similarity),
    while ``mean`` / ``floor_mean`` stay the similarity itself, as the paper reports it. ``plot`` (the main
    process): Delta L against K under ``out/plots``.
    """
    qi = {q: i for i, q in enumerate(eval_q)}
    whats = ["dl", "dg"] + (["dg_clip"] if all("dg_clip" in v for v in done.values()) else [])
    sign = {"dl": 1.0, "dg": 1.0, "dg_clip": -1.0}

    def against_floor(vals: list[float], floor: list[list[float]], what: str) -> dict[str, Any]:
        sg = sign[what]
        g = grade_against_random([sg * v for v in vals], [[sg * x for x in f] for f in floor])
        g["mean"], g["floor_mean"] = sg * g["mean"], sg * g["floor_mean"]
        g["clears_floor"] = clears_floor(g)
        return g

    def random_draws(k: int, what: str) -> list[list[float]]:
        rs = [v for v in done.values() if v["kind"] == "random" and v["k"] == k]
        return [[r[what][qi[q]] for r in rs] for q in eval_q]

    table: dict[str, Any] = {}
    metrics: dict[str, float] = {}
    curves: dict[str, dict[int, tuple[float, float]]] = {"random": {}}
    for k in ks:
        for what in whats:
            floor = random_draws(k, what)
            curves_key = "random"
            if what == "dl":
                curves[curves_key][k] = mean_se([np.mean(f) for f in floor])
            for m in methods:
                vals = [done[f"{m}|{q}|{k}"][what][qi[q]] for q in eval_q]
                g = against_floor(vals, floor, what)
                table.setdefault(m, {}).setdefault(f"k{k}", {})[what] = g
                metrics[f"lko/{what}/{m}/k{k}"] = g["mean"]
                metrics[f"lko/{what}_gain/{m}/k{k}"] = g["gain_mean"]
                if what == "dl":
                    curves.setdefault(m, {})[k] = (g["mean"], g["se"])
            metrics[f"lko/{what}/random/k{k}"] = float(np.mean([np.mean(f) for f in floor]))
    # head to head: paired per-query differences between every two methods at each K
    pairwise: dict[str, Any] = {}
    for i, a in enumerate(methods):
        for b in methods[i + 1 :]:
            for k in ks:
                for what in whats:
                    diff = [
                        sign[what] * (done[f"{a}|{q}|{k}"][what][qi[q]] - done[f"{b}|{q}|{k}"][what][qi[q]])
                        for q in eval_q
                    ]
                    mean, se = mean_se(diff)
                    z = mean / se if se > 0 else None
                    pairwise.setdefault(f"{a}-{b}", {}).setdefault(f"k{k}", {})[what] = {
                        "mean": mean,
                        "se": se,
                        "z": z,
                    }
    control: dict[str, Any] = {}
    if oracle:
        for what in whats:
            vals = [done[f"oracle|{q}|{len(gt[q])}"][what][qi[q]] for q in eval_q]
            floor = [random_draws(len(gt[q]), what)[qi[q]] for q in eval_q]
            g = against_floor(vals, floor, what)
            control[what] = g
            metrics[f"lko/{what}/oracle"] = g["mean"]
        if not control["dl"]["clears_floor"]:
            log.warning(
                "the positive control (removing the planted exemplars) does not clear the random floor on "
                "Delta L: this evaluation cannot rank methods (more queries or a better-trained theta0)"
            )
    lko = {
        "queries": eval_q,
        "ks": ks,
        "table": table,
        "positive_control": control,
        "pairwise": pairwise,
        "valid": bool(control.get("dl", {}).get("clears_floor", True)),
        "reference_equals_theta0": same,
        "retrains_run": trained,
        "jobs": done,
    }
    art = [plot_delta_vs_k(curves, out / "plots" / "delta_l_vs_k.png")] if plot else []
    return lko, metrics, art
