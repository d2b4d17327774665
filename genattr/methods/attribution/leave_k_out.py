"""The counterfactual gold standard of an AbU run: retrain without a method's top-K, measure what the query lost.

Once the queries are scored, :class:`LeaveKOut` lists the retrain jobs the scores call for (with
``coupling=coupled`` the reference retrain that removes nothing, the random-K floor, the positive control, each
method's top-K), writes them as ``retrain_plan.json`` (:mod:`~genattr.methods.attribution.retrain_plan`), and
runs one engine stage per job: the retrain (trained here, or read from the cache of the plan's Hydra jobs) is
measured by the :class:`~genattr.methods.attribution.probe.QueryProbe` against the reference, and the measured
jobs are graded at the end (:mod:`~genattr.methods.attribution.grading`). theta_ref is theta0 for independent
retrains (the paper's Eq. 2), and the coupled retrain that removes nothing for coupled ones, which is theta0
itself when theta0 was trained by this code (the twin). ``method.evaluation.retrains``: ``inline`` trains missing
retrains in this run; ``plan`` writes the plan and adds no stage (the run stops there); ``cached`` only reads
the cache and fails, naming the first missing retrain, before any is measured.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from genattr.data.mscoco import AttributionProtocol
from genattr.engine.training import per_process
from genattr.methods.attribution.features import build_towers, image_decoder, tag_towers
from genattr.methods.attribution.grading import grade
from genattr.methods.attribution.probe import QueryProbe, deltas
from genattr.methods.attribution.retrain_cache import RetrainCache
from genattr.methods.attribution.retrain_plan import PLAN_FILE, build_plan, missing_jobs, write_plan
from genattr.methods.attribution.training import TrainRecipe
from genattr.metrics.attribution import ranking
from genattr.models.diffusion import DiffusionModel
from genattr.utils.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: where leave-K-out retrains are trained: in this process, by Hydra jobs from a plan file (stop after writing
#: it), or only read from the cache (fail naming the missing ones)
RETRAIN_MODES = ("inline", "plan", "cached")


@dataclass(frozen=True)
class Job:
    """One retrain of the evaluation: who asked for it (``kind``: reference, random, oracle or a method, and
    ``who``: the random seed or the query), its K, and the training images it removes."""

    kind: str
    who: Any
    k: int
    removed: list[int]

    @property
    def key(self) -> str:
        return f"{self.kind}|{self.who}|{self.k}"


def evaluated_queries(cfg: Mapping[str, Any], queries: Sequence[int], gt: Mapping[int, Any]) -> list[int]:
    """The scored queries the evaluation measures (with ground truth unless ``ground_truth_only`` is off)."""
    eval_q = [q for q in queries if (q in gt or not cfg["ground_truth_only"])]
    if cfg["max_queries"]:
        eval_q = eval_q[: int(cfg["max_queries"])]
    if not eval_q:
        raise ConfigError(
            "method.evaluation found no query to evaluate (no ground truth; set "
            "method.evaluation.ground_truth_only=false)"
        )
    return eval_q


class LeaveKOut:
    """The leave-K-out evaluation of one run (see the module docstring); ``done`` holds the measured jobs."""

    def __init__(
        self,
        cfg: Mapping[str, Any],
        *,
        protocol: AttributionProtocol,
        queries: Sequence[int],
        scores: Mapping[str, np.ndarray],
        theta0: DiffusionModel,
        cache: RetrainCache,
        features: Mapping[str, Mapping[str, Any]],
        noise_seed: int,
        acc: Accelerator,
        tracker: Any,
        output_dir: Path,
    ) -> None:
        self.cfg, self.protocol, self.theta0, self.cache = cfg, protocol, theta0, cache
        self.features, self.noise_seed = features, int(noise_seed)
        self.acc, self.tracker, self.out = acc, tracker, output_dir
        self.gt = protocol.ground_truth or {}
        self.eval_q = evaluated_queries(cfg, queries, self.gt)
        self.ks = [int(k) for k in cfg["ks"]]
        self.methods = [m for m in cfg["methods"] if m != "random"]
        for m in self.methods:
            if m not in scores:
                raise ConfigError(f"method.evaluation.methods has {m}, which was not scored (see method.baselines)")
        self.oracle = bool(cfg["oracle"]) and all(q in self.gt for q in self.eval_q)
        self.coupled = cache.coupling == "coupled"
        self.jobs = self._jobs(list(queries), scores)
        self.mode = str(cfg["retrains"])
        self.done: dict[str, Any] = {}
        self._probe: QueryProbe | None = None
        self._ref: dict[str, np.ndarray] | None = None
        self._ref_model: DiffusionModel | None = None
        self.same = True  # the reference equals theta0 (set by _reference)
        self.delta_g: dict[str, Any] = {}
        self.plan = build_plan(cache, [(j.key, j.removed) for j in self.jobs])
        self.plan_path = output_dir / PLAN_FILE
        if acc.is_main_process:
            self.plan = write_plan(self.plan_path, self.plan, protocol.name)
        self.plan = _broadcast_plan(acc, self.plan)
        if self.mode == "cached":
            absent = missing_jobs(self.plan, cache)
            if absent:
                first = absent[0]
                raise DataError(
                    f"method.evaluation.retrains=cached: {len(absent)} of {len(self.plan['jobs'])} planned retrains "
                    f"are not in {cache.folder} (first missing: {first['key']}, job {first['index']}, for "
                    f"{', '.join(first['uses'])}); train them with `{self.plan['command']}` (plus this run's "
                    "data/model/trainer overrides), then run this again"
                )
        if self.mode == "plan":
            log.warning(
                "retrain plan written to %s; train its %d jobs with (plus this run's data/model/trainer overrides):"
                "\n  %s\nthen run again with method.evaluation.retrains=cached",
                self.plan_path,
                len(self.plan["jobs"]),
                self.plan["command"],
            )

    def _jobs(self, queries: list[int], scores: Mapping[str, np.ndarray]) -> list[Job]:
        """Reference (coupled only: independent retrains are compared with theta0 itself, the paper's Eq. 2),
        random-K floor, positive control, each method's top-K."""
        cfg, gt, n = self.cfg, self.gt, self.protocol.n_train
        rand_ks = sorted(set(self.ks) | ({len(gt[q]) for q in self.eval_q} if self.oracle else set()))
        jobs = [Job("reference", None, 0, [])] if self.coupled else []
        for k in rand_ks:
            for s in range(int(cfg["random_seeds"])):
                rng = np.random.default_rng([int(cfg["random_seed"]), k, s])
                jobs.append(Job("random", s, k, sorted(rng.choice(n, k, replace=False).tolist())))
        if self.oracle:
            jobs += [Job("oracle", q, len(gt[q]), sorted(gt[q])) for q in self.eval_q]
        row = {q: j for j, q in enumerate(queries)}
        for m in self.methods:
            for q in self.eval_q:
                order = ranking(scores[m][row[q]])
                jobs += [Job(m, q, k, sorted(order[:k].tolist())) for k in self.ks]
        return jobs

    # -- the engine's stages: one per job ----------------------------------------------------------
    def stage_names(self) -> list[str]:
        """One stage per retrain job, none when the retrains are left to the plan's Hydra jobs."""
        return [] if self.mode == "plan" else [f"retrain {j.key}" for j in self.jobs]

    def run_job(self, i: int) -> dict[str, float]:
        """Retrain (or read) job ``i`` and measure its Delta L / Delta G against the reference."""
        job = self.jobs[i]
        t0, trained = time.perf_counter(), self.cache.trained
        ref = self._reference()
        model = self._ref_model if not job.removed else self.cache.model(job.removed, train=self.mode == "inline")
        assert model is not None  # _reference
        d = deltas(ref, self._probe_for().measure(model))
        self.done[job.key] = {
            "kind": job.kind,
            "who": job.who,
            "k": job.k,
            "removed": job.removed,
            **{m: v.tolist() for m, v in d.items()},
            "seconds": time.perf_counter() - t0,
        }
        return {
            "retrain/dl_mean": float(np.mean(d["dl"])),
            "retrain/dg_mean": float(np.mean(d["dg"])),
            "retrain/trained": float(self.cache.trained - trained),
        }

    def restore(self, done: Mapping[str, Any]) -> None:
        self.done = dict(done)

    @property
    def regenerated(self) -> int:
        """Queries this process measured (regenerated) in this session, for ``results.json``."""
        return 0 if self._probe is None else self._probe.regenerated

    # -- measuring ---------------------------------------------------------------------------------
    def _probe_for(self) -> QueryProbe:
        """The Delta L / Delta G probe: the regeneration pipeline, the image decoder and the CLIP tower."""
        if self._probe is not None:
            return self._probe
        cfg, protocol, device = self.cfg, self.protocol, self.acc.device
        regen = dict(cfg["regen"])
        decode = image_decoder(protocol.pixel_space, protocol.vae, device)
        clip = None
        info: dict[str, Any] = {"regen": regen, "space": "pixels" if decode is not None else "latents"}
        if decode is None:
            log.warning(
                "Delta G on latents, not pixels, and without CLIP similarity: the data has no decoder "
                "(set data.vae=<the SD-2 VAE folder>)"
            )
        if bool(cfg["clip_similarity"]) and decode is not None:
            # a random-init tower (the twin) draws its weights from the global RNG without advancing it: every
            # retrain checkpoint then holds the RNG state it was built from, and a resumed run builds the same one
            with torch.random.fork_rng(devices=[]):
                towers = build_towers(["clip"], self.features, device)
            info["clip"] = tag_towers(self.tracker, self.acc.is_main_process, towers)["clip"]
            clip = towers["clip"]
        self._probe = QueryProbe(
            protocol.query_latents,
            protocol.query_text,
            self.eval_q,
            time_samples=int(cfg["loss_time_samples"]),
            seed=self.noise_seed + 2,
            num_train_timesteps=self.theta0.num_timesteps,
            regen=regen,
            null_text=protocol.null_text,
            to_images=decode,
            clip=clip,
            device=device,
            accelerator=self.acc,
        )
        self.delta_g = info
        log.info("Delta G: %s", info)
        return self._probe

    def _reference(self) -> dict[str, np.ndarray]:
        """theta_ref's measurement (theta0, or the coupled retrain that removes nothing), once per run."""
        if self._ref is not None:
            return self._ref
        probe = self._probe_for()  # before the reference retrain, as the CLIP tower always was
        ref_model = self.cache.model([], train=self.mode == "inline") if self.coupled else self.theta0
        theta0_state = self.theta0.unet.state_dict()
        self.same = all(torch.equal(v.cpu(), theta0_state[k].cpu()) for k, v in ref_model.unet.state_dict().items())
        if not self.same:
            log.warning(
                "the coupled retrain that removes nothing differs from the given theta0 (trained elsewhere "
                "or with another recipe); Delta L / Delta G are measured against that retrain"
            )
        self._ref_model = ref_model
        self._ref = probe.measure(ref_model)
        return self._ref

    # -- results -----------------------------------------------------------------------------------
    def results(self) -> tuple[dict[str, Any], dict[str, float], list[Path], bool]:
        """The ``leave_k_out`` entry of results.json, its metrics, its artifacts, and whether it is complete."""
        if self.mode == "plan":
            todo = {
                "retrain_plan": str(self.plan_path),
                "n_jobs": len(self.plan["jobs"]),
                "command": self.plan["command"],
            }
            return todo, {}, [self.plan_path], False
        if any(j.key not in self.done for j in self.jobs):
            return {"jobs": self.done}, {}, [], False
        self._reference()  # reference_equals_theta0 (a run resumed after its last retrain measured none)
        lko, metrics, art = grade(
            self.done,
            self.eval_q,
            self.ks,
            self.methods,
            self.oracle,
            self.gt,
            self.same,
            self.cache.trained,
            self.out,
            plot=self.acc.is_main_process,
        )
        lko["delta_g"] = self.delta_g
        lko["coupling"] = self.cache.coupling
        lko["reference"] = "coupled retrain removing nothing" if self.coupled else "theta0"
        return lko, metrics, art, True


def _broadcast_plan(acc: Accelerator, plan: dict[str, Any]) -> dict[str, Any]:
    """The main process's plan (with its launch command) on every process."""
    return per_process(acc, plan)[0]


def retrain_cache(
    cache_dir: Path,
    model_cfg: Mapping[str, Any],
    recipe: TrainRecipe,
    protocol: AttributionProtocol,
    coupling: str,
    acc: Accelerator,
) -> RetrainCache:
    """The shared retrain cache of this run's (data, model, recipe, coupling, precision)."""
    return RetrainCache(
        cache_dir / "unlearn_retrains",
        model_cfg,
        recipe,
        protocol.train_latents,
        protocol.train_text,
        coupling=coupling,
        accelerator=acc,
    )
