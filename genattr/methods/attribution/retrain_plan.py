"""Leave-K-out retrains as a plan file, so that they fan out as Hydra multirun jobs.

At paper scale each retrain is ~16 A100-hours, so the evaluation cannot train them in its own process.
With ``method.evaluation.retrains=plan`` (or ``cached``) it writes ``retrain_plan.json``: the shared
recipe (data fingerprint, model, training recipe and seed, coupling, their hash) and one job per distinct removed
set, each with the cache key it must produce. ``method=unlearn_retrain method.plan=<file>
method.job=<i>`` (:mod:`genattr.methods.attribution.retrain_job`) trains job ``i`` into the shared
retrain cache, one Hydra job each (``-m ... method.job=0,1,2 hydra/launcher=local|slurm``); the
evaluation with ``retrains=cached`` then only reads the cache.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from genattr.methods.attribution.retrain_cache import RetrainCache
from genattr.utils.errors import DataError
from genattr.utils.io import atomic_write_json

PLAN_VERSION = 2  # 2: the coupling of the retrains (method.evaluation.coupling)
PLAN_FILE = "retrain_plan.json"
_KEYS = ("version", "cache_folder", "base_hash", "data_fingerprint", "model", "recipe", "coupling", "jobs")


def launch_command(plan_path: Path, data_name: str, n_jobs: int) -> str:
    """The multirun that trains every job of the plan (one Hydra job per retrain)."""
    jobs = ",".join(str(i) for i in range(n_jobs)) if n_jobs <= 8 else f"'range(0,{n_jobs})'"
    return (
        f"python launch.py -m method=unlearn_retrain data={data_name} method.plan={plan_path} "
        f"method.job={jobs} hydra/launcher=local"
    )


def build_plan(cache: RetrainCache, entries: Sequence[tuple[str, Sequence[int]]]) -> dict[str, Any]:
    """One job per distinct removed set of ``entries`` ((evaluation entry, removed indices)), in order."""
    jobs: dict[str, dict[str, Any]] = {}
    for use, removed in entries:
        key = cache.key(removed)
        if key not in jobs:
            jobs[key] = {"index": len(jobs), "key": key, "removed": sorted(int(i) for i in removed), "uses": []}
        jobs[key]["uses"].append(use)
    return {
        "version": PLAN_VERSION,
        "cache_folder": str(cache.folder.expanduser().resolve()),
        "base_hash": cache.base_hash,
        "data_fingerprint": cache.base["data"],
        "model": cache.model_cfg,
        "recipe": cache.recipe.as_dict(),
        "coupling": cache.coupling,
        "mixed_precision": cache.base.get("mixed_precision", "no"),
        "jobs": list(jobs.values()),
    }


def write_plan(path: Path, plan: dict[str, Any], data_name: str) -> dict[str, Any]:
    """Write ``plan`` (plus the launch command) atomically to ``path``; return what was written."""
    path = Path(path).resolve()
    plan = {**plan, "command": launch_command(path, data_name, len(plan["jobs"]))}
    atomic_write_json(path, plan)
    return plan


def read_plan(path: str | Path) -> dict[str, Any]:
    """A plan written by :func:`write_plan`, or a :class:`DataError` naming the file and what is wrong."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(
            f"method.plan={path} does not exist; the evaluation writes it (method.evaluation.retrains=plan)"
        )
    try:
        plan = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"method.plan={path} is not a readable retrain plan ({err})") from err
    missing = [k for k in _KEYS if k not in plan] if isinstance(plan, dict) else list(_KEYS)
    if missing or plan.get("version") != PLAN_VERSION:
        raise DataError(
            f"method.plan={path} is not a version-{PLAN_VERSION} retrain plan (lacks {missing or 'version'})"
        )
    return plan


def missing_jobs(plan: dict[str, Any], cache: RetrainCache) -> list[dict[str, Any]]:
    """Jobs of ``plan`` whose retrain is not in ``cache`` yet."""
    return [job for job in plan["jobs"] if not cache.has(job["removed"])]
