"""``method=unlearn_retrain``: train the retrains of a leave-K-out plan into the shared retrain cache.

One Hydra job per retrain::

    python launch.py -m method=unlearn_retrain data=mscoco method.plan=<run>/retrain_plan.json \
        method.job=0,1,2 hydra/launcher=local          # or hydra/launcher=slurm

The model, the training recipe and the coupling come from the plan (they define the cache key); the training data
come from ``data=...`` and must have the plan's fingerprint. A job whose retrain is already cached
returns at once, and a pre-empted job simply trains again (the cache file is written atomically), so
re-launching the whole sweep is always safe.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from genattr.data.mscoco import AttributionProtocol
from genattr.methods.attribution.leave_k_out import RetrainCache
from genattr.methods.attribution.retrain_plan import read_plan
from genattr.methods.attribution.training import TrainRecipe, recipe_from_trainer
from genattr.methods.base import Report, RunContext
from genattr.models.diffusion import diffusion_kwargs
from genattr.utils.errors import ConfigError, DataError

log = logging.getLogger(__name__)


class PlannedRetrain:
    """Train job ``job`` of the plan ``plan`` (every job in turn when ``job`` is null)."""

    supports = ("attribution",)

    def __init__(
        self,
        *,
        name: str,
        model: Mapping[str, Any],
        trainer: Mapping[str, Any],
        plan: str | None = None,
        job: int | None = None,
        **unused: Any,
    ) -> None:
        # ``unused``: method=unlearn settings that data=mscoco's twin profile adds; a retrain reads none
        if not plan:
            raise ConfigError("method=unlearn_retrain needs method.plan=<retrain_plan.json written by the evaluation>")
        self.name = name
        self.plan_path = plan
        self.job = None if job is None else int(job)
        self.own_model = diffusion_kwargs(model) if "unet" in model else None
        self.own_recipe = recipe_from_trainer(trainer).as_dict() if "epochs" in trainer else None

    def run(self, protocol: AttributionProtocol, ctx: RunContext) -> Report:
        plan = read_plan(self.plan_path)
        jobs = plan["jobs"]
        if self.job is not None and not 0 <= self.job < len(jobs):
            raise ConfigError(f"method.job={self.job} is outside the {len(jobs)} jobs of {self.plan_path}")
        todo = jobs if self.job is None else [jobs[self.job]]
        cache = RetrainCache(
            plan["cache_folder"],
            plan["model"],
            TrainRecipe(**plan["recipe"]),
            protocol.train_latents,
            protocol.train_text,
            coupling=plan["coupling"],
            accelerator=ctx.accelerator,
        )
        if cache.base["data"] != plan["data_fingerprint"]:
            raise DataError(
                f"data={protocol.name} ({protocol.source}) is not the training set the plan {self.plan_path} was "
                "made on; launch the retrains with the evaluation's data overrides"
            )
        if (self.own_model, self.own_recipe) != (plan["model"], plan["recipe"]):
            log.warning("this job's model/trainer settings differ from the plan's; the plan's are used")
        done = []
        for job in todo:
            if cache.key(job["removed"]) != job["key"]:
                raise DataError(
                    f"job {job['index']} of {self.plan_path} expects the retrain {job['key']}, but its removed set "
                    f"and recipe hash to {cache.key(job['removed'])}; write the plan again with this genattr version"
                )
            t0 = time.perf_counter()
            trained = not cache.has(job["removed"])
            cache.model(job["removed"])
            secs = time.perf_counter() - t0
            log.info(
                "job %d: retrain %s %s in %.1fs", job["index"], job["key"], "trained" if trained else "cached", secs
            )
            ctx.tracker.log_metrics({"retrain/seconds": secs, "retrain/trained": float(trained)}, step=job["index"])
            done.append({**job, "trained": trained, "seconds": secs, "path": str(cache.path(job["removed"]))})
        results = {
            "method": self.name,
            "data": protocol.name,
            "plan": str(self.plan_path),
            "base_hash": plan["base_hash"],
            "jobs": done,
        }
        summary = ", ".join(f"{j['key']} {'trained' if j['trained'] else 'already cached'}" for j in done)
        return Report({"retrain/trained": float(sum(j["trained"] for j in done))}, results, summary=summary)
