"""``method=unlearn_retrain``: train the retrains of a leave-K-out plan into the shared retrain cache.

One Hydra job per retrain::

    python launch.py -m method=unlearn_retrain data=mscoco method.plan=<run>/retrain_plan.json \
        method.job=0,1,2 hydra/launcher=local          # or hydra/launcher=slurm

The model, the training recipe and the coupling come from the plan (they define the cache key); the training data
come from ``data=...`` and must have the plan's fingerprint, ``trainer.mixed_precision`` its precision. Each job
of a run is a stage of the engine (a run with ``method.job=null`` trains every job in turn and resumes after the
last finished one). A job whose retrain is already cached returns at once, and a pre-empted job simply trains
again (the cache file is written atomically), so re-launching the whole sweep is always safe.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from genattr.data.mscoco import AttributionProtocol
from genattr.engine.stages import StagedRun
from genattr.methods.attribution.retrain_cache import RetrainCache
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
        return PlanJobs(self, protocol, ctx).run()


class PlanJobs:
    """The jobs of one ``method=unlearn_retrain`` run as stages of the engine, one retrain each."""

    stage_kind = "retrain"

    def __init__(self, method: PlannedRetrain, protocol: AttributionProtocol, ctx: RunContext) -> None:
        self.m, self.protocol, self.ctx = method, protocol, ctx
        plan = read_plan(method.plan_path)
        jobs = plan["jobs"]
        if method.job is not None and not 0 <= method.job < len(jobs):
            raise ConfigError(f"method.job={method.job} is outside the {len(jobs)} jobs of {method.plan_path}")
        self.plan = plan
        self.todo = jobs if method.job is None else [jobs[method.job]]
        self.cache = RetrainCache(
            plan["cache_folder"],
            plan["model"],
            TrainRecipe(**plan["recipe"]),
            protocol.train_latents,
            protocol.train_text,
            coupling=plan["coupling"],
            accelerator=ctx.accelerator,
        )
        if self.cache.base["data"] != plan["data_fingerprint"]:
            raise DataError(
                f"data={protocol.name} ({protocol.source}) is not the training set the plan {method.plan_path} was "
                "made on; launch the retrains with the evaluation's data overrides"
            )
        planned = plan.get("mixed_precision", "no")  # plans written before it was recorded: fp32
        precision = str(ctx.accelerator.mixed_precision)
        if precision != planned:
            raise ConfigError(
                f"trainer.mixed_precision={precision}, but the plan {method.plan_path} was made with "
                f"trainer.mixed_precision={planned}; launch the retrains with the evaluation's trainer overrides"
            )
        if (method.own_model, method.own_recipe) != (plan["model"], plan["recipe"]):
            log.warning("this job's model/trainer settings differ from the plan's; the plan's are used")
        self.done: list[dict[str, Any]] = []

    def run(self) -> Report:
        return StagedRun(self, self.ctx, title=f"{self.m.name}: {len(self.todo)} job(s) of {self.m.plan_path}").run()

    def stage_names(self) -> list[str]:
        return [f"job {job['index']} ({job['key']})" for job in self.todo]

    def identity(self) -> dict[str, Any]:
        return {"plan": self.plan["base_hash"], "jobs": [job["key"] for job in self.todo]}

    def run_stage(self, k: int) -> dict[str, float]:
        job = self.todo[k]
        if self.cache.key(job["removed"]) != job["key"]:
            raise DataError(
                f"job {job['index']} of {self.m.plan_path} expects the retrain {job['key']}, but its removed set "
                f"and recipe hash to {self.cache.key(job['removed'])}; write the plan again with this genattr version"
            )
        t0 = time.perf_counter()
        trained = not self.cache.has(job["removed"])
        self.cache.model(job["removed"])
        secs = time.perf_counter() - t0
        log.info("job %d: retrain %s %s in %.1fs", job["index"], job["key"], "trained" if trained else "cached", secs)
        self.done.append({**job, "trained": trained, "seconds": secs, "path": str(self.cache.path(job["removed"]))})
        return {"retrain/seconds": secs, "retrain/trained": float(trained)}

    def checkpoint(self, k: int) -> tuple[Callable[[Path], None], dict[str, Any]]:
        return (lambda folder: None), {"done": self.done}

    def restore(self, folder: Path, state: Mapping[str, Any]) -> None:
        self.done = list(state["done"])

    def report(self, *, completed: bool, last: int) -> Report:
        results = {
            "method": self.m.name,
            "data": self.protocol.name,
            "plan": str(self.m.plan_path),
            "base_hash": self.plan["base_hash"],
            "jobs": self.done,
        }
        summary = ", ".join(f"{j['key']} {'trained' if j['trained'] else 'already cached'}" for j in self.done)
        trained = float(sum(j["trained"] for j in self.done))
        return Report({"retrain/trained": trained}, results, summary=summary, completed=completed)
