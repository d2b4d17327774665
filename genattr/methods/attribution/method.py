"""``method=unlearn``: attribution by unlearning (AbU) with its baselines and the leave-K-out evaluation.

Stages, each ending in a checkpoint (``resume=auto`` continues after the last one):

0. Fisher (from the data's Fisher file or computed), the pre-unlearning loss sweep, and the baselines
   (random, pixel cosine, CLIP text similarity, CLIP / DINO feature cosine, one-step influence) for every query,
   with what each compared (decoded pixels or latents, CLIP text or the model's encoder) in ``baseline_inputs``;
1..Q. one stage per query: unlearn it, sweep the training losses again, score tau = after - before
   (max over flips), restore the weights;
Q+1... one stage per leave-K-out retrain (random-K floor, positive control, each method's top-K, and with
   ``method.evaluation.coupling=coupled`` the reference retrain that removes nothing).
   Where the retrains are trained is ``method.evaluation.retrains``: ``inline`` here; ``plan`` writes
   ``<output>/retrain_plan.json`` and stops, for one Hydra job per retrain (``method=unlearn_retrain``);
   ``cached`` only reads the retrain cache (see :mod:`genattr.methods.attribution.retrain_plan`).

Per-query scores live in ``<output>/scores/query_XXXX.npz``; the Fisher and the pre-unlearning losses in
``<output>/state/``, so a resumed run reads them instead of recomputing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from genattr.data.mscoco import AttributionProtocol, read_train_captions
from genattr.methods.attribution import baselines as bl
from genattr.methods.attribution.features import (
    FeatureTower,
    TextTower,
    build_towers,
    image_similarity_scores,
    pixel_embed,
    text_similarity_scores,
    weights_source,
)
from genattr.methods.attribution.leave_k_out import QueryProbe, RetrainCache, deltas
from genattr.methods.attribution.losses import CAPTION_NOISE, loss_sweep, max_over_flips, strided_timesteps
from genattr.methods.attribution.plots import plot_delta_vs_k, plot_query_grid
from genattr.methods.attribution.retrain_plan import PLAN_FILE, build_plan, missing_jobs, write_plan
from genattr.methods.attribution.training import check_coupling, recipe_from_trainer
from genattr.methods.attribution.unlearning import (
    diagonal_fisher,
    precondition,
    query_gradient,
    restore,
    select_parameters,
    snapshot,
    unlearn,
)
from genattr.methods.base import Report, RunContext
from genattr.metrics.attribution import (
    average_precision,
    clears_floor,
    grade_against_random,
    mean_se,
    positive_ranks,
    ranking,
    recall_at_k,
)
from genattr.models.diffusion import (
    SAMPLERS,
    DiffusionModel,
    build_diffusion,
    decode_latents,
    diffusion_kwargs,
    load_unet_weights,
    load_vae,
)
from genattr.utils.errors import ConfigError, DataError
from genattr.utils.io import atomic_write_json

log = logging.getLogger(__name__)
BASELINES = ("random", "pixel", "text", "clip", "dino", "influence")
#: what the text baseline compares: CLIP ViT-B/32 text embeddings of the captions (the paper) or the model's
#: own text-encoder states from the release (no captions needed)
TEXT_BASELINES = ("clip", "encoder")
#: baselines that compare image features of a tower in ``method.features``
FEATURE_BASELINES = ("clip", "dino")
#: where leave-K-out retrains are trained: in this process, by Hydra jobs from a plan file (stop after writing
#: it), or only read from the cache (fail naming the missing ones)
RETRAIN_MODES = ("inline", "plan", "cached")


def _load_fisher(path: Path, names: Sequence[str]) -> dict[str, torch.Tensor]:
    try:
        raw = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any parse failure is a bad file
        raise DataError(f"{path} is not a readable Fisher file (dict name -> diagonal tensor): {err}") from err
    missing = [n for n in names if n not in raw]
    if missing:
        raise DataError(f"{path} has no Fisher for {len(missing)} selected parameters (e.g. {missing[0]})")
    return {n: raw[n].double() for n in names}


class AttributionByUnlearning:
    """AbU (Wang et al., NeurIPS 2024) on a ``attribution`` protocol; see ``conf/method/unlearn.yaml``."""

    supports = ("attribution",)

    def __init__(
        self,
        *,
        name: str,
        model: Mapping[str, Any],
        trainer: Mapping[str, Any],
        weights: str = "cross_attn_kv",
        unlearn: Mapping[str, Any],
        fisher: Mapping[str, Any],
        sweep: Mapping[str, Any],
        baselines: Sequence[str] = BASELINES,
        text_baseline: str = "clip",
        influence: Mapping[str, Any] | None = None,
        features: Mapping[str, Any] | None = None,
        queries: Sequence[int] | None = None,
        recall_ks: Sequence[int] = (10,),
        plot_top_k: int = 8,
        evaluation: Mapping[str, Any] | None = None,
        noise_seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        self.name = name
        if "unet" not in model:
            raise ConfigError("method=unlearn needs a diffusion model config with model.unet (e.g. model=unet_mscoco)")
        self.model_cfg = diffusion_kwargs(model)
        self.recipe = recipe_from_trainer(trainer)
        self.weights = weights
        self.unlearn_cfg, self.fisher_cfg, self.sweep_cfg = dict(unlearn), dict(fisher), dict(sweep)
        self.caption_noise = str(self.sweep_cfg.get("caption_noise", "independent"))
        if self.caption_noise not in CAPTION_NOISE:
            raise ConfigError(
                f"method.sweep.caption_noise={self.caption_noise} is unknown; choose one of {list(CAPTION_NOISE)}"
            )
        if self.caption_noise != "independent":
            log.warning(
                "method.sweep.caption_noise=%s: one loss-sweep noise draw per (image, t) shared by all captions; "
                "the original draws one per (image, caption, t)",
                self.caption_noise,
            )
        if float(self.unlearn_cfg.get("damping", 0.0)) != 0.0:
            log.warning(
                "method.unlearn.damping=%s: F + damping * mean(F) per tensor (FastGDA); the original AbU update is "
                "undamped (damping=0)",
                self.unlearn_cfg["damping"],
            )
        unknown = sorted(set(baselines) - set(BASELINES))
        if unknown:
            raise ConfigError(f"method.baselines has unknown entries {unknown}; valid: {list(BASELINES)}")
        self.baselines = list(baselines)
        self.influence_cfg = dict(influence or {})
        self.features_cfg = {k: dict(v) for k, v in dict(features or {}).items()}
        self.text_baseline = str(text_baseline)
        if self.text_baseline not in TEXT_BASELINES:
            raise ConfigError(
                f"method.text_baseline={self.text_baseline} is unknown; choose one of {list(TEXT_BASELINES)}"
            )
        if "text" in self.baselines and self.text_baseline != "clip":
            log.warning(
                "method.text_baseline=%s: the text baseline compares the model's own text-encoder states; the paper's "
                "is the CLIP ViT-B/32 text embedding of the captions (text_baseline=clip)",
                self.text_baseline,
            )
        needed = [b for b in self.baselines if b in FEATURE_BASELINES]
        if dict(evaluation or {}).get("clip_similarity", False):
            needed.append("clip")
        if "text" in self.baselines and self.text_baseline == "clip":
            needed.append("clip_text")
        missing = sorted(set(needed) - set(self.features_cfg))
        if missing:
            raise ConfigError(f"method.features has no tower for {missing} (name, weights, pretrained, resize, crop)")
        self.queries = None if queries is None else [int(q) for q in queries]
        self.recall_ks = [int(k) for k in recall_ks]
        self.plot_top_k = int(plot_top_k)
        self.eval_cfg = dict(evaluation or {})
        mode = self.eval_cfg.get("retrains", "inline")
        if mode not in RETRAIN_MODES:
            raise ConfigError(f"method.evaluation.retrains={mode} is unknown; choose one of {list(RETRAIN_MODES)}")
        self.coupling = check_coupling(str(self.eval_cfg.get("coupling", "independent")))
        if self.eval_cfg.get("enabled", False) and self.coupling != "independent":
            log.warning(
                "method.evaluation.coupling=%s: leave-K-out retrains share theta0's random stream (removed images "
                "weigh 0) and Delta L is taken against the coupled retrain that removes nothing; the paper retrains "
                "from scratch (coupling=independent)",
                self.coupling,
            )
        regen = dict(self.eval_cfg.get("regen") or {})
        if self.eval_cfg.get("enabled", False) and regen.get("scheduler") not in SAMPLERS:
            raise ConfigError(
                f"method.evaluation.regen.scheduler={regen.get('scheduler')} is unknown; choose one of {list(SAMPLERS)}"
            )
        self.noise_seed = int(noise_seed)
        self.cache_dir = Path(cache_dir or ".cache").expanduser()

    # -- helpers ----------------------------------------------------------------------------------
    def _theta0(self, protocol: AttributionProtocol, device: torch.device) -> DiffusionModel:
        model = build_diffusion(**self.model_cfg)
        load_unet_weights(model.unet, protocol.unet_weights)
        model.unet.to(device)
        return model

    def _sweep(self, model: DiffusionModel, protocol: AttributionProtocol, device: torch.device) -> np.ndarray:
        ts = strided_timesteps(model.num_timesteps, int(self.sweep_cfg["time_samples"]))
        return loss_sweep(
            model,
            protocol.train_latents,
            protocol.train_text,
            range(protocol.train_latents.shape[0]),
            ts,
            seed=self.noise_seed,
            batch_size=int(self.sweep_cfg["batch_size"]),
            caption_noise=self.caption_noise,
            device=device,
        )

    def _image_decoder(
        self, protocol: AttributionProtocol, device: torch.device
    ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Latents -> images in [-1, 1]: the identity on the twin, the ``data.vae`` on real data, else None."""
        if protocol.pixel_space:
            return lambda x: x.float().clamp(-1, 1)
        if protocol.vae is None:
            return None
        vae = load_vae(protocol.vae, device)
        return lambda x: decode_latents(vae, x)

    def _towers(self, keys: Sequence[str], device: torch.device) -> dict[str, FeatureTower]:
        return build_towers(list(keys), self.features_cfg, device)

    def _tag_towers(self, ctx: RunContext, towers: Mapping[str, FeatureTower]) -> dict[str, dict[str, str]]:
        info = {k: {"name": t.name, "weights": t.source} for k, t in towers.items()}
        set_tags = getattr(ctx.tracker, "set_tags", None)
        if info and set_tags is not None and ctx.accelerator.is_main_process:
            set_tags({f"features.{k}": v["weights"] for k, v in info.items()})
        return info

    def _query(self, protocol: AttributionProtocol, q: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.from_numpy(protocol.query_latents[q]).to(device),
            torch.from_numpy(protocol.query_text[q, 0]).to(device),
        )

    def _save(self, ctx: RunContext, task: int, stage: str, extra: dict[str, Any] | None = None) -> None:
        state = {
            "task": task,
            "stage": stage,
            "mlflow_run_id": getattr(ctx.tracker, "run_id", None),
            "config_fingerprint": ctx.config_fingerprint,
            **(extra or {}),
        }
        if ctx.accelerator.is_main_process:
            ctx.checkpoints.save(task, lambda folder: None, state)
        ctx.accelerator.wait_for_everyone()

    def _stop(self, ctx: RunContext, task: int) -> bool:
        return ctx.stop_after_task is not None and task >= int(ctx.stop_after_task)

    # -- stage 0 ----------------------------------------------------------------------------------
    def _prepare(self, protocol, model, names, queries, ctx, device, state_dir: Path) -> None:
        t0 = time.perf_counter()
        if protocol.fisher is not None and self.fisher_cfg.get("source", "auto") in ("auto", "file"):
            fisher = _load_fisher(protocol.fisher, names)
            log.info("Fisher read from %s", protocol.fisher)
        elif self.fisher_cfg.get("source", "auto") == "file":
            raise DataError("method.fisher.source=file but the data folder has no Fisher file (fisher_info.*)")
        else:
            fisher = diagonal_fisher(
                model,
                protocol.train_latents,
                protocol.train_text,
                names,
                epochs=int(self.fisher_cfg["epochs"]),
                batch_size=int(self.fisher_cfg["batch_size"]),
                seed=self.noise_seed + 1,
                device=device,
            )
        fisher_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        before = self._sweep(model, protocol, device)
        sweep_s = time.perf_counter() - t0
        scores, towers_info, inputs = self._similarity_baselines(protocol, queries, ctx, device)
        if "influence" in self.baselines:
            dirs = [
                precondition(
                    query_gradient(
                        model,
                        names,
                        *self._query(protocol, q, device),
                        draws=int(self.unlearn_cfg["draws"]),
                        batch_size=int(self.unlearn_cfg["batch_size"]),
                        seed=q,
                    ),
                    fisher,
                    float(self.unlearn_cfg["damping"]),
                )
                for q in queries
            ]
            stacked = {nm: torch.stack([d[nm] for d in dirs]) for nm in names}
            ts = strided_timesteps(model.num_timesteps, int(self.influence_cfg.get("time_samples", 4)))
            scores["influence"] = bl.influence_scores(
                model,
                names,
                stacked,
                protocol.train_latents,
                protocol.train_text,
                ts,
                seed=self.noise_seed,
                batch_size=int(self.influence_cfg.get("batch_size", 64)),
                device=device,
            )
        if ctx.accelerator.is_main_process:
            state_dir.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in fisher.items()}, str(state_dir / "fisher.safetensors"))
            np.save(state_dir / "pretrain_loss.npy", before)
            np.savez(state_dir / "baselines.npz", queries=np.asarray(queries), **scores)
            atomic_write_json(state_dir / "timing.json", {"fisher_s": fisher_s, "sweep_s": sweep_s})
            atomic_write_json(state_dir / "feature_towers.json", towers_info)
            atomic_write_json(state_dir / "baseline_inputs.json", inputs)
        ctx.tracker.log_metrics({"time/fisher_s": fisher_s, "time/sweep_s": sweep_s}, step=0)

    def _similarity_baselines(
        self, protocol: AttributionProtocol, queries: list[int], ctx: RunContext, device: torch.device
    ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, str]], dict[str, str]]:
        """Scores of the random, pixel, text, clip and dino baselines, the towers used and each one's inputs.

        pixel: cosine of flattened [-1, 1] images (the model's training images: FastGDA
        ``abu/coco/prepare_latents_text_embeds.py`` centre-crops to 128 px and normalises to [-1, 1]), decoded by
        ``data.vae`` on real data (``decoded_pixels``), the latents themselves on the twin (``pixels``), the
        release's latents without a VAE (``latents``, warned). text: CLIP ViT-B/32 text embeddings of the
        captions (``clip_text``) or the model's own text-encoder states (``encoder``). Every decoded chunk of
        training rows serves all image baselines at once.
        """
        scores: dict[str, np.ndarray] = {}
        towers_info: dict[str, dict[str, str]] = {}
        inputs: dict[str, str] = {}
        n = protocol.n_train
        if "random" in self.baselines:
            scores["random"] = np.stack([bl.random_scores(n, self.noise_seed * 7919 + q) for q in queries])
        decoded_pixels = "pixel" in self.baselines and not protocol.pixel_space and protocol.vae is not None
        if "pixel" in self.baselines and not decoded_pixels:
            inputs["pixel"] = "pixels" if protocol.pixel_space else "latents"
            if not protocol.pixel_space:
                log.warning(
                    "pixel baseline on the release's latents, not pixels: set data.vae=<the SD-2 VAE folder> to "
                    "compare decoded images as the paper does (recorded as baseline_inputs.pixel=latents)"
                )
            scores["pixel"] = np.stack(
                [bl.pixel_cosine(protocol.query_latents[q], protocol.train_latents) for q in queries]
            )
        if "text" in self.baselines:
            captions = self._text_captions(protocol)
            if captions is None:
                inputs["text"] = "encoder"
                scores["text"] = np.stack(
                    [bl.text_similarity(protocol.query_text[q], protocol.train_text) for q in queries]
                )
            else:
                inputs["text"] = "clip_text"
                tower = TextTower("clip_text", device=device, **self.features_cfg["clip_text"])
                towers_info.update(self._tag_towers(ctx, {"clip_text": tower}))
                assert protocol.query_captions is not None  # _text_captions
                scores["text"] = text_similarity_scores(tower, [protocol.query_captions[q] for q in queries], captions)
        feats = [b for b in self.baselines if b in FEATURE_BASELINES]
        if feats or decoded_pixels:
            decode = self._image_decoder(protocol, device)
            assert decode is not None  # _preflight
            towers = self._towers(feats, device)
            towers_info.update(self._tag_towers(ctx, towers))
            embedders: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {k: t.embed for k, t in towers.items()}
            if decoded_pixels:
                inputs["pixel"] = "decoded_pixels"
                embedders["pixel"] = pixel_embed
            lat = protocol.train_latents
            q_images = decode(torch.from_numpy(np.asarray(protocol.query_latents[queries], dtype=np.float32)))
            scores.update(
                image_similarity_scores(
                    embedders,
                    q_images,
                    lambda a, b: decode(torch.from_numpy(np.array(lat[a:b], dtype=np.float32))),
                    lat.shape[0],
                )
            )
        set_tags = getattr(ctx.tracker, "set_tags", None)
        if inputs and set_tags is not None and ctx.accelerator.is_main_process:
            set_tags({f"baseline_inputs.{k}": v for k, v in inputs.items()})
        log.info("baseline inputs: %s", inputs)
        return scores, towers_info, inputs

    def _text_captions(self, protocol: AttributionProtocol) -> list[str] | None:
        """The training captions of the CLIP-text baseline, or None (the encoder fallback, warned about)."""
        if self.text_baseline != "clip":
            return None
        missing = []
        if protocol.train_captions is None:
            missing.append(
                f"the training captions ({protocol.root / 'annotations/captions_train2017.json'}; "
                "data.files.train_captions=<file>)"
            )
        if not protocol.query_captions or len(protocol.query_captions) < protocol.n_queries:
            missing.append(f"a prompt per query ({protocol.root / 'sample_caption.txt'})")
        if missing:
            log.warning(
                "method.text_baseline=clip needs %s; the text baseline falls back to the model's own text-encoder "
                "embeddings (recorded as baseline_inputs.text=encoder)",
                " and ".join(missing),
            )
            return None
        return read_train_captions(protocol.train_captions, protocol.n_train)

    # -- the run ----------------------------------------------------------------------------------
    def run(self, protocol: AttributionProtocol, ctx: RunContext) -> Report:
        acc = ctx.accelerator
        device = acc.device
        out = ctx.output_dir
        state_dir, score_dir = out / "state", out / "scores"
        queries = list(range(protocol.n_queries)) if self.queries is None else self.queries
        bad = [q for q in queries if not 0 <= q < protocol.n_queries]
        if bad:
            raise ConfigError(f"method.queries has {bad} outside the {protocol.n_queries} queries of the data")
        self._preflight(protocol)
        model = self._theta0(protocol, device)
        names = select_parameters(model.unet, self.weights)
        n_sel = sum(dict(model.unet.named_parameters())[n].numel() for n in names)
        log.info("AbU on %d %s parameters (%d tensors), %d queries", n_sel, self.weights, len(names), len(queries))
        start = self._resume(ctx)
        if start == 0:
            self._prepare(protocol, model, names, queries, ctx, device, state_dir)
            self._save(ctx, 0, "prepare")
            if self._stop(ctx, 0):
                return Report({}, {}, summary="stopped after the Fisher stage", completed=False)
            start = 1
        fisher = {k: v.double() for k, v in load_file(str(state_dir / "fisher.safetensors")).items()}
        before = np.load(state_dir / "pretrain_loss.npy")
        timing = json.loads((state_dir / "timing.json").read_text())
        n_train = int(self.unlearn_cfg.get("n_train") or protocol.n_train)
        for j, q in enumerate(queries):
            task = j + 1
            if task < start:
                continue
            t0 = time.perf_counter()
            saved = snapshot(model, names)
            x0, cond = self._query(protocol, q, device)
            unlearn(
                model,
                names,
                fisher,
                x0,
                cond,
                alpha=float(self.unlearn_cfg["alpha"]),
                n_train=n_train,
                steps=int(self.unlearn_cfg["steps"]),
                draws=int(self.unlearn_cfg["draws"]),
                batch_size=int(self.unlearn_cfg["batch_size"]),
                damping=float(self.unlearn_cfg["damping"]),
                seed=q,
            )
            unlearn_s = time.perf_counter() - t0
            after = self._sweep(model, protocol, device)
            restore(model, saved)
            tau = max_over_flips(after - before)
            secs = time.perf_counter() - t0
            if acc.is_main_process:
                score_dir.mkdir(parents=True, exist_ok=True)
                np.savez(score_dir / f"query_{q:04d}.npz", tau=tau, seconds=secs, unlearn_seconds=unlearn_s)
            ctx.tracker.log_metrics(
                {"query/seconds": secs, "query/tau_mean": float(tau.mean()), "query/tau_max": float(tau.max())},
                step=task,
            )
            log.info("query %d: %.1fs, tau mean %.3g max %.3g", q, secs, tau.mean(), tau.max())
            self._save(ctx, task, "query", {"query": q})
            if self._stop(ctx, task):
                return Report({}, {}, summary=f"stopped after query {q}", completed=False)
        scores = self._collect(queries, state_dir, score_dir)
        results, metrics, artifacts = self._retrieval(protocol, queries, scores, out)
        results["timing"] = {
            **timing,
            "query_seconds_mean": float(
                np.mean([float(np.load(score_dir / f"query_{q:04d}.npz")["seconds"]) for q in queries])
            ),
        }
        results["weights"] = {"subset": self.weights, "n_params": n_sel, "n_tensors": len(names)}
        towers_file, inputs_file = state_dir / "feature_towers.json", state_dir / "baseline_inputs.json"
        results["feature_towers"] = json.loads(towers_file.read_text()) if towers_file.is_file() else {}
        results["baseline_inputs"] = json.loads(inputs_file.read_text()) if inputs_file.is_file() else {}
        results["settings"] = {
            "damping": float(self.unlearn_cfg["damping"]),
            "caption_noise": self.caption_noise,
            "coupling": self.coupling,
            "text_baseline": self.text_baseline,
        }
        completed = True
        if self.eval_cfg.get("enabled", False):
            lko, lko_metrics, lko_art, completed = self._leave_k_out(
                protocol, model, queries, scores, ctx, first_task=len(queries) + 1
            )
            results["leave_k_out"] = lko
            metrics.update(lko_metrics)
            artifacts += lko_art
        results.update(
            {
                "method": self.name,
                "data": protocol.name,
                "data_source": protocol.source,
                "seed": ctx.seed,
                "queries": queries,
            }
        )
        random_init = {k for k, v in results["feature_towers"].items() if v.get("weights") == "random_init"}
        summary = " ".join(
            f"mAP[{m}{'(random-init tower)' if m in random_init else ''}]={v:.3f}"
            for m, v in results.get("map", {}).items()
        )
        if "command" in results.get("leave_k_out", {}):
            lko = results["leave_k_out"]
            summary += (
                f"\nretrain plan {lko['retrain_plan']} ({lko['n_jobs']} jobs); train it with (plus this run's "
                "data/model/trainer overrides)\n"
                f"  {lko['command']}\n"
                "then run this command again with method.evaluation.retrains=cached"
            )
        return Report(metrics, results, artifacts, summary=summary or "AbU scores written", completed=completed)

    def _preflight(self, protocol: AttributionProtocol) -> None:
        """Inputs the later stages need, checked before hours of Fisher and sweeps are spent."""
        feats = [b for b in self.baselines if b in FEATURE_BASELINES]
        if feats and not protocol.pixel_space and protocol.vae is None:
            raise ConfigError(
                f"method.baselines has {feats}, which compare images, but the data's latents need a decoder: "
                "set data.vae=<the SD-2 VAE folder> or drop them from method.baselines"
            )
        towers = list(feats)
        if "text" in self.baselines and self.text_baseline == "clip" and protocol.train_captions is not None:
            towers.append("clip_text")
        decodes = protocol.pixel_space or protocol.vae is not None
        if self.eval_cfg.get("enabled", False) and self.eval_cfg.get("clip_similarity", True) and decodes:
            towers.append("clip")
        for k in dict.fromkeys(towers):  # weights file present, or hub weights reachable
            tower = self.features_cfg[k]
            weights_source(k, tower["name"], tower.get("weights"), bool(tower.get("pretrained", True)))
        regen = dict(self.eval_cfg.get("regen") or {})
        if self.eval_cfg.get("enabled", False) and float(regen.get("guidance_scale", 1)) > 1:
            if protocol.null_text is None:
                raise DataError(
                    f"{protocol.root / 'null_text_embedding.npy'} does not exist: Delta G regenerates the queries "
                    f"with classifier-free guidance (method.evaluation.regen.guidance_scale={regen['guidance_scale']}) "
                    "against the empty prompt's embedding (1, tokens, dim), e.g. the SD-2 OpenCLIP encoding of "
                    '""; add it or set method.evaluation.regen.guidance_scale=1'
                )

    def _resume(self, ctx: RunContext) -> int:
        found = ctx.checkpoints.latest_for(ctx.config_fingerprint)
        if found is None:
            return 0
        folder, state = found
        log.warning("resuming after checkpoint %s (stage %s)", folder.name, state.get("stage"))
        ctx.tracker.log_metrics({"resume/from_task": float(state["task"])}, step=int(state["task"]))
        return int(state["task"]) + 1

    def _collect(self, queries: list[int], state_dir: Path, score_dir: Path) -> dict[str, np.ndarray]:
        base = np.load(state_dir / "baselines.npz")
        out = {"unlearn": np.stack([np.load(score_dir / f"query_{q:04d}.npz")["tau"] for q in queries])}
        out.update({k: base[k] for k in self.baselines})
        return out

    # -- retrieval metrics, plots -------------------------------------------------------------------
    def _retrieval(self, protocol, queries, scores, out: Path) -> tuple[dict, dict[str, float], list[Path]]:
        gt = protocol.ground_truth or {}
        per_query, artifacts = [], []
        aps: dict[str, list[float]] = {m: [] for m in scores}
        recalls: dict[str, dict[int, list[float]]] = {m: {k: [] for k in self.recall_ks} for m in scores}
        for j, q in enumerate(queries):
            entry: dict[str, Any] = {"query": q, "ground_truth": gt.get(q)}
            if protocol.query_captions:
                entry["prompt"] = protocol.query_captions[q]
            tops = {}
            for m, s in scores.items():
                order = ranking(s[j])
                tops[m] = order[: self.plot_top_k].tolist()
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
                    for k in self.recall_ks:
                        row[f"recall@{k}"] = recall_at_k(order, gt[q], k)
                        recalls[m][k].append(row[f"recall@{k}"])
                entry[m] = row
            per_query.append(entry)
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
                for k in self.recall_ks:
                    metrics[f"recall_at_{k}/{m}"] = results["recall"][m][str(k)]
        return results, metrics, artifacts

    # -- leave-K-out --------------------------------------------------------------------------------
    def _leave_k_out(self, protocol, theta0, queries, scores, ctx, first_task: int):
        cfg = self.eval_cfg
        gt = protocol.ground_truth or {}
        eval_q = [q for q in queries if (q in gt or not cfg.get("ground_truth_only", True))]
        if cfg.get("max_queries"):
            eval_q = eval_q[: int(cfg["max_queries"])]
        if not eval_q:
            raise ConfigError(
                "method.evaluation found no query to evaluate (no ground truth; set "
                "method.evaluation.ground_truth_only=false)"
            )
        ks = [int(k) for k in cfg["ks"]]
        methods = [m for m in cfg["methods"] if m != "random"]
        for m in methods:
            if m not in scores:
                raise ConfigError(f"method.evaluation.methods has {m}, which was not scored (see method.baselines)")
        row = {q: j for j, q in enumerate(queries)}
        oracle = bool(cfg.get("oracle", True)) and all(q in gt for q in eval_q)
        rand_ks = sorted(set(ks) | ({len(gt[q]) for q in eval_q} if oracle else set()))
        n = protocol.n_train
        # the job list: reference (coupled only: independent retrains are compared with theta0 itself, the
        # paper's Eq. 2), random-K floor, positive control, each method's top-K
        coupled = self.coupling == "coupled"
        jobs: list[tuple[str, Any, int, list[int]]] = [("reference", None, 0, [])] if coupled else []
        for k in rand_ks:
            for s in range(int(cfg["random_seeds"])):
                rng = np.random.default_rng([int(cfg.get("random_seed", 0)), k, s])
                jobs.append(("random", s, k, sorted(rng.choice(n, k, replace=False).tolist())))
        if oracle:
            for q in eval_q:
                jobs.append(("oracle", q, len(gt[q]), sorted(gt[q])))
        for m in methods:
            for q in eval_q:
                order = ranking(scores[m][row[q]])
                for k in ks:
                    jobs.append((m, q, k, sorted(order[:k].tolist())))
        cache = RetrainCache(
            self.cache_dir / "unlearn_retrains",
            self.model_cfg,
            self.recipe,
            protocol.train_latents,
            protocol.train_text,
            coupling=self.coupling,
            accelerator=ctx.accelerator,
        )
        mode = str(cfg.get("retrains", "inline"))
        plan = build_plan(cache, [(f"{kd}|{w}|{k}", rm) for kd, w, k, rm in jobs])
        plan_path = ctx.output_dir / PLAN_FILE
        if ctx.accelerator.is_main_process:
            plan = write_plan(plan_path, plan, protocol.name)
        ctx.accelerator.wait_for_everyone()
        if mode == "plan":
            log.warning(
                "retrain plan written to %s; train its %d jobs with (plus this run's data/model/trainer overrides):"
                "\n  %s\nthen run again with "
                "method.evaluation.retrains=cached",
                plan_path,
                len(plan["jobs"]),
                plan.get("command"),
            )
            todo = {"retrain_plan": str(plan_path), "n_jobs": len(plan["jobs"]), "command": plan.get("command")}
            return todo, {}, [plan_path], False
        if mode == "cached":
            absent = missing_jobs(plan, cache)
            if absent:
                first = absent[0]
                raise DataError(
                    f"method.evaluation.retrains=cached: {len(absent)} of {len(plan['jobs'])} planned retrains are "
                    f"not in {cache.folder} (first missing: {first['key']}, job {first['index']}, for "
                    f"{', '.join(first['uses'])}); train them with `{plan.get('command')}` (plus this run's "
                    "data/model/trainer overrides), then run this again"
                )
        probe, dg_info = self._probe(protocol, eval_q, theta0, ctx)
        train = mode == "inline"
        found = ctx.checkpoints.latest()
        done: dict[str, Any] = dict(found[1].get("lko", {})) if found else {}
        ref_model = cache.model([], train=train) if coupled else theta0
        ref = probe.measure(ref_model)
        theta0_state = theta0.unet.state_dict()
        same = all(torch.equal(v.cpu(), theta0_state[k].cpu()) for k, v in ref_model.unet.state_dict().items())
        if not same:
            log.warning(
                "the coupled retrain that removes nothing differs from the given theta0 (trained elsewhere "
                "or with another recipe); Delta L / Delta G are measured against that retrain"
            )
        for j, (kind, who, k, removed) in enumerate(jobs):
            task = first_task + j
            key = f"{kind}|{who}|{k}"
            if key in done:
                continue
            t0 = time.perf_counter()
            model = ref_model if not removed else cache.model(removed, train=train)
            d = deltas(ref, probe.measure(model))
            done[key] = {
                "kind": kind,
                "who": who,
                "k": k,
                "removed": removed,
                **{m: v.tolist() for m, v in d.items()},
                "seconds": time.perf_counter() - t0,
            }
            self._save(ctx, task, "retrain", {"lko": done})
            if self._stop(ctx, task):
                return {"jobs": done}, {}, [], False
        lko, metrics, art = self._grade(done, eval_q, ks, methods, oracle, gt, same, cache.trained, ctx.output_dir)
        lko["delta_g"] = dg_info
        lko["coupling"] = self.coupling
        lko["reference"] = "coupled retrain removing nothing" if coupled else "theta0"
        return lko, metrics, art, True

    def _probe(self, protocol, eval_q, theta0, ctx) -> tuple[QueryProbe, dict[str, Any]]:
        """The Delta L / Delta G probe: the regeneration pipeline, the image decoder and the CLIP tower."""
        cfg = self.eval_cfg
        regen = dict(cfg["regen"])
        device = ctx.accelerator.device
        decode = self._image_decoder(protocol, device)
        clip = None
        info: dict[str, Any] = {"regen": regen, "space": "pixels" if decode is not None else "latents"}
        if decode is None:
            log.warning(
                "Delta G on latents, not pixels, and without CLIP similarity: the data has no decoder "
                "(set data.vae=<the SD-2 VAE folder>)"
            )
        if bool(cfg.get("clip_similarity", True)) and decode is not None:
            towers = self._towers(["clip"], device)
            info["clip"] = self._tag_towers(ctx, towers)["clip"]
            clip = towers["clip"]
        probe = QueryProbe(
            protocol.query_latents,
            protocol.query_text,
            eval_q,
            time_samples=int(cfg["loss_time_samples"]),
            seed=self.noise_seed + 2,
            num_train_timesteps=theta0.num_timesteps,
            regen=regen,
            null_text=protocol.null_text,
            to_images=decode,
            clip=clip,
            device=device,
        )
        log.info("Delta G: %s", info)
        return probe, info

    def _grade(self, done, eval_q, ks, methods, oracle, gt, same, trained, out: Path):
        """Grade every method against the random floor per K on Delta L, Delta G MSE and (if measured) CLIP.

        The CLIP similarity falls when a regeneration changes, so it is graded on its negation: every gain,
        z and pairwise difference below means "changed the query more" (for ``dg_clip``: lower similarity),
        while ``mean`` / ``floor_mean`` stay the similarity itself, as the paper reports it.
        """
        qi = {q: i for i, q in enumerate(eval_q)}
        whats = ["dl", "dg"] + (["dg_clip"] if all("dg_clip" in v for v in done.values()) else [])
        sign = {"dl": 1.0, "dg": 1.0, "dg_clip": -1.0}

        def grade(vals: list[float], floor: list[list[float]], what: str) -> dict[str, Any]:
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
                    g = grade(vals, floor, what)
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
                g = grade(vals, floor, what)
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
        art = [plot_delta_vs_k(curves, out / "plots" / "delta_l_vs_k.png")]
        return lko, metrics, art
