"""AbU as stages of the engine (:mod:`genattr.engine.stages`): prepare, one stage per query, one per retrain.

0. prepare: the Fisher (from the data's Fisher file or computed), the pre-unlearning loss sweep, and the
   baselines of every query (random, pixel, text, clip, dino, one-step influence);
1..Q. one stage per query: unlearn it, sweep the training losses again, score tau = after - before (max over
   flips), restore the weights;
Q+1... with ``method.evaluation.enabled``, one stage per leave-K-out retrain
   (:class:`~genattr.methods.attribution.leave_k_out.LeaveKOut`): the stage list grows once the queries are
   scored, since the retrains follow from the scores.

What a stage leaves behind is what it always left: ``<output>/state/`` (``fisher.safetensors``,
``pretrain_loss.npy``, ``baselines.npz``, ``timing.json``, ``feature_towers.json``, ``baseline_inputs.json``) after
stage 0 and ``<output>/scores/query_XXXX.npz`` (tau, seconds, unlearn_seconds) after each query, written by the
main process and read back by a resumed run; a checkpoint's state holds the query of a query stage and the
measured retrain jobs (``lko``). Restoring, saving with the RNG state, stopping and the stage header are the
engine's.

The sweeps over the training rows are shared by the processes (:class:`~genattr.methods.attribution.sweeps.Sweeps`).
A query's unlearning step is one small computation (a few hundred (t, eps) draws of one image): every process
runs it on its own copy of the weights, so none waits, and then takes the main process's result (a broadcast
of the selected tensors), so that every shard of the next sweep is scored against exactly the same weights even
where GPU kernels are not deterministic.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from genattr.data.mscoco import AttributionProtocol
from genattr.engine.stages import StagedRun
from genattr.engine.training import per_process
from genattr.methods.attribution.leave_k_out import LeaveKOut, evaluated_queries, retrain_cache
from genattr.methods.attribution.losses import max_over_flips, strided_timesteps
from genattr.methods.attribution.retrain_cache import data_fingerprint
from genattr.methods.attribution.retrieval import retrieval
from genattr.methods.attribution.sweeps import Sweeps
from genattr.methods.attribution.unlearning import (
    precondition,
    query_gradient,
    restore,
    select_parameters,
    snapshot,
    unlearn,
)
from genattr.methods.base import Report, RunContext
from genattr.utils.errors import DataError
from genattr.utils.io import atomic_write_json

if TYPE_CHECKING:
    from genattr.methods.attribution.method import AttributionByUnlearning

log = logging.getLogger(__name__)


def load_fisher(path: Path, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The data's Fisher file (dict name -> diagonal tensor) for the selected parameters, float64."""
    try:
        raw = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any parse failure is a bad file
        raise DataError(f"{path} is not a readable Fisher file (dict name -> diagonal tensor): {err}") from err
    missing = [n for n in names if n not in raw]
    if missing:
        raise DataError(f"{path} has no Fisher for {len(missing)} selected parameters (e.g. {missing[0]})")
    return {n: raw[n].double() for n in names}


class AbuStages:
    """One AbU run on the engine (see the module docstring)."""

    stage_kind = "stage"

    def __init__(
        self, method: AttributionByUnlearning, protocol: AttributionProtocol, ctx: RunContext, queries: list[int]
    ) -> None:
        self.m, self.protocol, self.ctx, self.queries = method, protocol, ctx, queries
        self.acc = ctx.accelerator
        self.device = self.acc.device
        self.model = method.theta0(protocol, self.device)
        self.names = select_parameters(self.model.unet, method.weights)
        params = dict(self.model.unet.named_parameters())
        self.n_selected = sum(params[n].numel() for n in self.names)
        log.info(
            "AbU on %d %s parameters (%d tensors), %d queries",
            self.n_selected,
            method.weights,
            len(self.names),
            len(queries),
        )
        self.state_dir, self.score_dir = ctx.output_dir / "state", ctx.output_dir / "scores"
        self.sweeps = Sweeps(self.acc, protocol.train_latents, protocol.train_text)
        self.fisher: dict[str, torch.Tensor] = {}
        self.before = np.zeros(0)
        self.last = -1  # the last stage done (run here or restored)
        self._lko: LeaveKOut | None = None

    def run(self) -> Report:
        title = f"{self.m.name} on {self.protocol.name} ({self.protocol.source})"
        return StagedRun(self, self.ctx, title=title).run()

    # -- the engine's protocol -----------------------------------------------------------------------
    def stage_names(self) -> list[str]:
        names = ["prepare", *(f"query {q}" for q in self.queries)]
        if self.m.eval_cfg["enabled"] and self.last >= len(self.queries):
            names += self.evaluation().stage_names()
        return names

    def identity(self) -> dict[str, Any]:
        """The queries, the training set's fingerprint and, with the evaluation on, the queries it measures."""
        ident: dict[str, Any] = {
            "queries": self.queries,
            "data": data_fingerprint(self.protocol.train_latents, self.protocol.train_text),
        }
        if self.m.eval_cfg["enabled"]:
            ident["evaluated_queries"] = evaluated_queries(
                self.m.eval_cfg, self.queries, self.protocol.ground_truth or {}
            )
        return ident

    def run_stage(self, k: int) -> dict[str, float]:
        n_q = len(self.queries)
        if k == 0:
            metrics = self.prepare()
        elif k <= n_q:
            metrics = self.score_query(self.queries[k - 1])
        else:
            metrics = self.evaluation().run_job(k - n_q - 1)
        self.last = k
        return metrics

    def checkpoint(self, k: int) -> tuple[Callable[[Path], None], dict[str, Any]]:
        n_q = len(self.queries)
        state: dict[str, Any] = {}
        if 1 <= k <= n_q:
            state["query"] = self.queries[k - 1]
        elif k > n_q:
            state["lko"] = self.evaluation().done
        return (lambda folder: None), state

    def restore(self, folder: Path, state: Mapping[str, Any]) -> None:
        self.last = int(state["task"])
        self.fisher = {k: v.double() for k, v in load_file(str(self.state_dir / "fisher.safetensors")).items()}
        self.before = np.load(self.state_dir / "pretrain_loss.npy")
        if "lko" in state:
            self.evaluation().restore(state["lko"])

    # -- stage 0 -------------------------------------------------------------------------------------
    def prepare(self) -> dict[str, float]:
        m, protocol, model, names = self.m, self.protocol, self.model, self.names
        t0 = time.perf_counter()
        source = m.fisher_cfg["source"]
        if protocol.fisher is not None and source in ("auto", "file"):
            fisher = load_fisher(protocol.fisher, names)
            log.info("Fisher read from %s", protocol.fisher)
        elif source == "file":
            raise DataError("method.fisher.source=file but the data folder has no Fisher file (fisher_info.*)")
        else:
            fisher = self.sweeps.fisher(
                model,
                names,
                epochs=int(m.fisher_cfg["epochs"]),
                batch_size=int(m.fisher_cfg["batch_size"]),
                seed=m.noise_seed + 1,
            )
        fisher_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        before = self._sweep("loss sweep before unlearning")
        sweep_s = time.perf_counter() - t0
        scores, towers_info, inputs = m._similarity_baselines(
            protocol, self.queries, self.ctx, self.device, sweeps=self.sweeps
        )
        if "influence" in m.baselines:
            scores["influence"] = self._influence(fisher)
        if self.acc.is_main_process:
            state_dir = self.state_dir
            state_dir.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in fisher.items()}, str(state_dir / "fisher.safetensors"))
            np.save(state_dir / "pretrain_loss.npy", before)
            np.savez(state_dir / "baselines.npz", queries=np.asarray(self.queries), **scores)
            atomic_write_json(state_dir / "timing.json", {"fisher_s": fisher_s, "sweep_s": sweep_s})
            atomic_write_json(state_dir / "feature_towers.json", towers_info)
            atomic_write_json(state_dir / "baseline_inputs.json", inputs)
        self.fisher, self.before = fisher, before
        return {"time/fisher_s": fisher_s, "time/sweep_s": sweep_s}

    def _influence(self, fisher: Mapping[str, torch.Tensor]) -> np.ndarray:
        """The one-step influence baseline: F^-1 grad L(query) of every query against every training row."""
        m, model, names = self.m, self.model, self.names
        dirs = [
            precondition(
                query_gradient(
                    model,
                    names,
                    *self._query(q),
                    draws=int(m.unlearn_cfg["draws"]),
                    batch_size=int(m.unlearn_cfg["batch_size"]),
                    seed=q,
                ),
                fisher,
                float(m.unlearn_cfg["damping"]),
            )
            for q in self.queries
        ]
        stacked = {nm: torch.stack([d[nm] for d in dirs]) for nm in names}
        ts = strided_timesteps(model.num_timesteps, int(m.influence_cfg["time_samples"]))
        return self.sweeps.influence(
            model, names, stacked, ts, seed=m.noise_seed, batch_size=int(m.influence_cfg["batch_size"])
        )

    # -- stages 1..Q ---------------------------------------------------------------------------------
    def score_query(self, q: int) -> dict[str, float]:
        m, model, names = self.m, self.model, self.names
        t0 = time.perf_counter()
        saved = snapshot(model, names)
        x0, cond = self._query(q)
        unlearn(
            model,
            names,
            self.fisher,
            x0,
            cond,
            alpha=float(m.unlearn_cfg["alpha"]),
            n_train=int(m.unlearn_cfg["n_train"] or self.protocol.n_train),
            steps=int(m.unlearn_cfg["steps"]),
            draws=int(m.unlearn_cfg["draws"]),
            batch_size=int(m.unlearn_cfg["batch_size"]),
            damping=float(m.unlearn_cfg["damping"]),
            seed=q,
        )
        self._take_main_weights()
        unlearn_s = time.perf_counter() - t0
        after = self._sweep(f"loss sweep after unlearning query {q}")
        restore(model, saved)
        tau = max_over_flips(after - self.before)
        secs = time.perf_counter() - t0
        if self.acc.is_main_process:
            self.score_dir.mkdir(parents=True, exist_ok=True)
            np.savez(self.score_dir / f"query_{q:04d}.npz", tau=tau, seconds=secs, unlearn_seconds=unlearn_s)
        log.info("query %d: %.1fs, tau mean %.3g max %.3g", q, secs, tau.mean(), tau.max())
        return {"query/seconds": secs, "query/tau_mean": float(tau.mean()), "query/tau_max": float(tau.max())}

    def _take_main_weights(self) -> None:
        """Every process's selected weights become the main process's (see the module docstring)."""
        if self.acc.num_processes == 1:
            return
        from accelerate.utils import broadcast

        params = dict(self.model.unet.named_parameters())
        broadcast([params[n].data for n in self.names], from_process=0)  # in place

    def _sweep(self, desc: str) -> np.ndarray:
        m = self.m
        return self.sweeps.losses(
            self.model,
            strided_timesteps(self.model.num_timesteps, int(m.sweep_cfg["time_samples"])),
            seed=m.noise_seed,
            batch_size=int(m.sweep_cfg["batch_size"]),
            caption_noise=m.caption_noise,
            desc=desc,
        )

    def _query(self, q: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.from_numpy(self.protocol.query_latents[q]).to(self.device),
            torch.from_numpy(self.protocol.query_text[q, 0]).to(self.device),
        )

    # -- stages Q+1.. --------------------------------------------------------------------------------
    def evaluation(self) -> LeaveKOut:
        """The leave-K-out evaluation, planned from the scores on first use (all queries must be scored)."""
        if self._lko is None:
            m = self.m
            cache = retrain_cache(m.cache_dir, m.model_cfg, m.recipe, self.protocol, m.coupling, self.acc)
            self._lko = LeaveKOut(
                m.eval_cfg,
                protocol=self.protocol,
                queries=self.queries,
                scores=self._collect(),
                theta0=self.model,
                cache=cache,
                features=m.features_cfg,
                noise_seed=m.noise_seed,
                acc=self.acc,
                tracker=self.ctx.tracker,
                output_dir=self.ctx.output_dir,
            )
        return self._lko

    def _collect(self) -> dict[str, np.ndarray]:
        base = np.load(self.state_dir / "baselines.npz")
        out = {"unlearn": np.stack([np.load(self._score_file(q))["tau"] for q in self.queries])}
        out.update({k: base[k] for k in self.m.baselines})
        return out

    def _score_file(self, q: int) -> Path:
        return self.score_dir / f"query_{q:04d}.npz"

    # -- the report ----------------------------------------------------------------------------------
    def report(self, *, completed: bool, last: int) -> Report:
        n_q = len(self.queries)
        if last < n_q or (not completed and last == n_q):
            what = "nothing" if last < 0 else "the Fisher stage" if last == 0 else f"query {self.queries[last - 1]}"
            return Report({}, {}, summary=f"stopped after {what}", completed=False)
        m, out = self.m, self.ctx.output_dir
        scores = self._collect()
        results, metrics, artifacts = retrieval(
            self.protocol,
            self.queries,
            scores,
            out,
            recall_ks=m.recall_ks,
            plot_top_k=m.plot_top_k,
            plot=self.acc.is_main_process,
        )
        timing = json.loads((self.state_dir / "timing.json").read_text())
        results["timing"] = {
            **timing,
            "query_seconds_mean": float(
                np.mean([float(np.load(self._score_file(q))["seconds"]) for q in self.queries])
            ),
        }
        results["weights"] = {"subset": m.weights, "n_params": self.n_selected, "n_tensors": len(self.names)}
        towers_file, inputs_file = self.state_dir / "feature_towers.json", self.state_dir / "baseline_inputs.json"
        results["feature_towers"] = json.loads(towers_file.read_text()) if towers_file.is_file() else {}
        results["baseline_inputs"] = json.loads(inputs_file.read_text()) if inputs_file.is_file() else {}
        results["settings"] = {
            "damping": float(m.unlearn_cfg["damping"]),
            "caption_noise": m.caption_noise,
            "coupling": m.coupling,
            "text_baseline": m.text_baseline,
        }
        lko_done = True
        if m.eval_cfg["enabled"]:
            lko, lko_metrics, lko_art, lko_done = self.evaluation().results()
            results["leave_k_out"] = lko
            metrics.update(lko_metrics)
            artifacts += lko_art
        results.update(
            {
                "method": m.name,
                "data": self.protocol.name,
                "data_source": self.protocol.source,
                "seed": self.ctx.seed,
                "queries": self.queries,
            }
        )
        results["per_process"] = self._per_process()
        return Report(metrics, results, artifacts, summary=self._summary(results), completed=completed and lko_done)

    def _per_process(self) -> dict[str, list[Any]]:
        """What each process computed in this session (rows of the loss sweeps, Fisher samples, influence rows,
        regenerated queries), in rank order: the evidence that the sweeps were shared."""
        out = {k: per_process(self.acc, v) for k, v in self.sweeps.counts.items()}
        out["regenerated_queries"] = per_process(self.acc, self._lko.regenerated if self._lko is not None else 0)
        return out

    @staticmethod
    def _summary(results: Mapping[str, Any]) -> str:
        random_init = {k for k, v in results["feature_towers"].items() if v.get("weights") == "random_init"}
        summary = " ".join(
            f"mAP[{m}{'(random-init tower)' if m in random_init else ''}]={v:.3f}"
            for m, v in results.get("map", {}).items()
        )
        lko = results.get("leave_k_out", {})
        if "command" in lko:
            summary += (
                f"\nretrain plan {lko['retrain_plan']} ({lko['n_jobs']} jobs); train it with (plus this run's "
                "data/model/trainer overrides)\n"
                f"  {lko['command']}\n"
                "then run this command again with method.evaluation.retrains=cached"
            )
        return summary or "AbU scores written"
