"""The AI-GenBench detector: cumulative training over chronological windows, scored after each.

Window k trains on windows 0..k (``cumulative``) for one epoch of ``augmentation_factor``
fixed variants per image (seeded by the image's position in the original's list
``[window k, k-1, ..., 0]``, so older images get new variants in every window; the logged
flag ``train_variants=kept`` keeps each image's first variants instead), starting from
window k-1's final weights with a *new* SGD and OneCycleLR schedule (the original starts
a fresh Lightning ``fit`` per window and loads only the state dict). After every window
the whole validation split goes through the mandatory pipeline and is scored on the Next /
Growing / Whole subsets. A finished window leaves a checkpoint and a ``done`` marker;
``resume=auto`` continues at the next window.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch.nn import functional as F
from torch.utils.data import DataLoader

from genattr.data.aigenbench.augment import mandatory_eval_pipeline, train_pipeline
from genattr.data.aigenbench.crops import check_crop
from genattr.data.aigenbench.dataset import SlidingWindowsProtocol
from genattr.data.aigenbench.splits import subset_mask
from genattr.data.aigenbench.views import EvalSet, FixedAugmentedTrainSet, collate_crops
from genattr.methods.base import Report, RunContext
from genattr.methods.detection.outputs import dump_predictions, load_predictions, window_plots
from genattr.metrics.detection import auroc, benchmark_score, subset_metrics
from genattr.models.detectors import Detector
from genattr.utils.errors import ConfigError
from genattr.utils.instantiate import build
from genattr.utils.seed import seed_everything

log = logging.getLogger(__name__)

SUBSETS = ("next", "growing", "whole")
#: method.train_variants -> the order of the cumulative training list (positions seed the variants)
TRAIN_VARIANTS = {"per_window": "newest_first", "kept": "oldest_first"}


def metric_key(name: str) -> str:
    """MLflow accepts only alphanumerics, ``_-. /`` in metric names (generator names have parentheses)."""
    return re.sub(r"[^0-9A-Za-z_\-. /]", "_", name)


class SlidingWindowDetector:
    """``method=detector``: a binary detector trained window by window (see module docstring)."""

    def __init__(
        self,
        *,
        name: str,
        model: Mapping[str, Any],
        trainer: Mapping[str, Any],
        supports: tuple[str, ...] | list[str] = ("sliding_windows",),
        augmentation_factor: int = 4,
        train_aug: str = "baseline",
        train_crop: str = "resize",
        eval_crop: str = "resize",
        train_variants: str = "per_window",
        dump_predictions: bool = True,
    ) -> None:
        check_crop("train", train_crop)
        check_crop("eval", eval_crop)
        if train_variants not in TRAIN_VARIANTS:
            raise ConfigError(f"method.train_variants={train_variants!r}; expected one of {list(TRAIN_VARIANTS)}")
        if augmentation_factor < 1:
            raise ConfigError(f"method.augmentation_factor must be >= 1, got {augmentation_factor}")
        self.name = name
        self.supports = tuple(supports)
        self.model_cfg = dict(model)
        self.trainer = dict(trainer)
        self.augmentation_factor = int(augmentation_factor)
        self.train_aug = train_aug
        self.train_crop = train_crop
        self.eval_crop = eval_crop
        self.train_variants = train_variants
        self.dump = bool(dump_predictions)

    def run(self, protocol: SlidingWindowsProtocol, ctx: RunContext) -> Report:
        return WindowLoop(self, protocol, ctx).run()


class WindowLoop:
    """One run of the sliding-windows protocol; holds the model, caches and results so far."""

    def __init__(self, method: SlidingWindowDetector, protocol: SlidingWindowsProtocol, ctx: RunContext) -> None:
        self.method, self.protocol, self.ctx = method, protocol, ctx
        self.acc = ctx.accelerator
        tr = method.trainer
        self.size = int(method.model_cfg.get("input_size", 224))
        self.global_batch = int(tr.get("global_batch_size", 512))
        self.micro = int(tr.get("batch_size", 64))
        world = self.acc.num_processes
        if self.global_batch % (self.micro * world):
            raise ConfigError(
                f"trainer.global_batch_size={self.global_batch} is not a multiple of trainer.batch_size={self.micro} "
                f"x {world} process(es); the global batch is reached by gradient accumulation, so choose a "
                "per-process batch_size that divides it"
            )
        self.accum = self.global_batch // (self.micro * world)
        self.workers = int(tr.get("num_workers", 0))
        cache = bool(tr.get("cache_images", False)) and self.workers == 0
        self.train_cache: dict | None = {} if cache else None
        self.eval_cache: dict | None = {} if cache else None
        ev = protocol.info.get("eval_pipeline", {})
        self.eval_pipeline = mandatory_eval_pipeline(**ev)
        self.train_pipeline = train_pipeline(method.train_aug, jpeg_quality=ev.get("jpeg_quality", "code"))
        self.per_window: list[dict[str, Any]] = []
        self.global_step = 0
        log.info(
            "detector: global batch %d = %d per process x %d process(es) x %d accumulation step(s)",
            self.global_batch,
            self.micro,
            world,
            self.accum,
        )
        log.info(
            "detector: method.train_variants=%s (training list %s; per_window is the original)",
            method.train_variants,
            TRAIN_VARIANTS[method.train_variants],
        )

    # -- checkpoints ------------------------------------------------------------------------------
    def _restore(self, model: Detector) -> int:
        found = self.ctx.checkpoints.latest_for(self.ctx.config_fingerprint)
        if found is None:
            return 0
        folder, state = found
        windows = [list(w) for w in self.protocol.timeline.windows]
        if state.get("timeline") != windows:
            raise ConfigError(f"the checkpoint {folder} is for the windows {state.get('timeline')}, not {windows}.")
        if not (folder / "done").is_file():
            raise ConfigError(f"{folder} has no 'done' marker; it is not a finished window")
        model.load_trainable_state(load_file(str(folder / "model.safetensors")))
        self.per_window = list(state["per_window"])
        self.global_step = int(state.get("global_step", 0))
        last = int(state["task"])
        log.warning("resumed from %s: window %d is done, continuing at window %d", folder, last, last + 1)
        self.ctx.tracker.log_metrics({"resume/from_window": float(last)}, step=last)
        return last + 1

    def _save(self, model: Detector, k: int) -> None:
        weights = model.trainable_state()

        def write(tmp: Path) -> None:
            save_file(weights, str(tmp / "model.safetensors"))
            (tmp / "done").touch()

        state = {
            "task": k,
            "window": k,
            "timeline": [list(w) for w in self.protocol.timeline.windows],
            "per_window": self.per_window,
            "global_step": self.global_step,
            "model": self.method.model_cfg.get("name"),
            "mlflow_run_id": getattr(self.ctx.tracker, "run_id", None),
            "config_fingerprint": self.ctx.config_fingerprint,
        }
        if self.acc.is_main_process:
            self.ctx.checkpoints.save(k, write, state)
        self.acc.wait_for_everyone()

    # -- training -----------------------------------------------------------------------------
    def _optimizer(self, model: Detector, steps: int) -> tuple[torch.optim.Optimizer, Any]:
        """SGD over the trainable parameters and a OneCycleLR over ``steps`` optimizer steps."""
        opt = self._sgd(model)
        return opt, self._onecycle(opt, steps)

    def _sgd(self, model: Detector) -> torch.optim.Optimizer:
        cfg = dict(self.method.trainer.get("optimizer", {}))
        return torch.optim.SGD(
            [p for p in model.parameters() if p.requires_grad],
            lr=float(cfg.get("lr", 1e-3)),
            momentum=float(cfg.get("momentum", 0.9)),
            dampening=float(cfg.get("dampening", 0.0)),
            weight_decay=float(cfg.get("weight_decay", 1e-4)),
        )

    def _onecycle(self, opt: torch.optim.Optimizer, steps: int) -> Any:
        """torch OneCycleLR; ``cycle_momentum`` overrides SGD's momentum (0.95 -> 0.85 -> 0.95)."""
        sch = dict(self.method.trainer.get("schedule", {}))
        return torch.optim.lr_scheduler.OneCycleLR(
            opt,
            max_lr=float(self.method.trainer.get("optimizer", {}).get("lr", 1e-3)),
            total_steps=steps,
            pct_start=float(sch.get("pct_start", 0.3)),
            anneal_strategy=str(sch.get("anneal_strategy", "cos")),
            cycle_momentum=bool(sch.get("cycle_momentum", True)),
            base_momentum=float(sch.get("base_momentum", 0.85)),
            max_momentum=float(sch.get("max_momentum", 0.95)),
            div_factor=float(sch.get("div_factor", 25.0)),
            final_div_factor=float(sch.get("final_div_factor", 1e4)),
        )

    def train_window(self, model_p: torch.nn.Module, model: Detector, k: int) -> dict[str, float]:
        """One window: new SGD + OneCycleLR over this window's optimizer steps, weights carried over."""
        protocol, acc, tr = self.protocol, self.acc, self.method.trainer
        seed_everything(self.ctx.seed * 1009 + k, deterministic=bool(tr.get("deterministic", True)))
        order = TRAIN_VARIANTS[self.method.train_variants]
        if self.train_cache is not None and order == "newest_first":
            self.train_cache.clear()  # every earlier image moves to a new position: no variant is reused
        data = FixedAugmentedTrainSet(
            protocol.train,
            protocol.training_positions(k, order),
            augmentation_factor=self.method.augmentation_factor,
            pipeline=self.train_pipeline,
            crop=self.method.train_crop,
            size=self.size,
            stream=(self.ctx.seed, k),
            cache=self.train_cache,
        )
        loader = DataLoader(
            data,
            batch_size=self.micro,
            shuffle=True,
            drop_last=True,
            num_workers=self.workers,
            pin_memory=acc.device.type == "cuda",
            generator=torch.Generator().manual_seed(self.ctx.seed * 1009 + k),
            persistent_workers=False,
        )
        epochs = int(tr.get("epochs_per_window", 1))
        opt = self._sgd(model)
        opt_p, loader_p = acc.prepare(opt, loader)
        per_epoch = len(loader_p) // self.accum  # an incomplete last accumulation group is dropped
        steps = per_epoch * epochs
        if per_epoch < 1:
            raise ConfigError(
                f"window {k} has {len(data)} training samples, fewer than one global batch of {self.global_batch}; "
                "lower trainer.global_batch_size"
            )
        sched = self._onecycle(opt, steps)  # on the raw optimizer: stepped once per optimizer step
        model_p.train()
        params = [p for p in model.parameters() if p.requires_grad]
        clip = tr.get("grad_clip", 1.0)
        log_every = max(1, int(tr.get("log_every_steps", 25)))
        losses: list[float] = []
        t0 = time.perf_counter()
        # epochs re-visit the same augmentation_factor fixed variants, reshuffled (as the original)
        for _epoch in range(epochs):
            it = iter(loader_p)
            for _ in range(per_epoch):
                total = 0.0
                for micro in range(self.accum):
                    x, y, _, _ = next(it)
                    sync = micro == self.accum - 1
                    with contextlib.nullcontext() if sync else acc.no_sync(model_p):
                        logits = model_p(x).float()
                        loss = F.binary_cross_entropy_with_logits(logits, y.float()) / self.accum
                        acc.backward(loss)
                    total += float(loss.detach())
                if clip is not None:
                    acc.clip_grad_norm_(params, float(clip))
                opt_p.step()
                sched.step()
                opt_p.zero_grad(set_to_none=True)
                losses.append(total)
                self.global_step += 1
                if len(losses) % log_every == 0 or len(losses) == steps:
                    self.ctx.tracker.log_metrics(
                        {"train/loss": float(np.mean(losses[-log_every:])), "train/lr": sched.get_last_lr()[0]},
                        step=self.global_step,
                    )
        seconds = time.perf_counter() - t0
        acc.free_memory()  # drop the prepared optimizer / loader (and their buffers); we keep model_p ourselves
        log.info("window %d: %d optimizer steps, loss %.4f, %.1f s", k, steps, float(np.mean(losses)), seconds)
        return {
            "train_loss": float(np.mean(losses)),
            "optimizer_steps": steps,
            "train_samples": len(data),
            "train_seconds": seconds,
        }

    # -- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, model_p: torch.nn.Module) -> dict[str, np.ndarray]:
        """Fused (mean sigmoid over crops) and per-crop scores of every validation image."""
        acc = self.acc
        data = EvalSet(
            self.protocol.validation,
            pipeline=self.eval_pipeline,
            crop=self.method.eval_crop,
            size=self.size,
            cache=self.eval_cache,
        )
        loader = DataLoader(
            data,
            batch_size=int(self.method.trainer.get("eval_batch_size", 64)),
            shuffle=False,
            num_workers=self.workers,
            collate_fn=collate_crops,
        )
        loader_p = acc.prepare_data_loader(loader)
        model_p.eval()
        parts: list[dict[str, np.ndarray]] = []
        for batch in loader_p:
            logits = model_p(batch["crops"]).float()
            idx = batch["crop_to_image_index"]
            crop_labels = batch["label"][idx].float()
            crop_scores = torch.sigmoid(logits)
            crop_losses = F.binary_cross_entropy_with_logits(logits, crop_labels, reduction="none")
            n = len(batch["label"])
            counts = torch.zeros(n, device=logits.device).index_add_(0, idx, torch.ones_like(crop_scores))
            fused = torch.zeros(n, device=logits.device).index_add_(0, idx, crop_scores) / counts
            fused_loss = torch.zeros(n, device=logits.device).index_add_(0, idx, crop_losses) / counts
            parts.append(
                {
                    "position": batch["position"].cpu().numpy(),
                    "fused_scores": fused.cpu().numpy(),
                    "fused_losses": fused_loss.cpu().numpy(),
                    "crop_scores": crop_scores.cpu().numpy(),
                    "crop_losses": crop_losses.cpu().numpy(),
                    "crop_position": batch["position"][idx].cpu().numpy(),
                }
            )
        acc.free_memory()
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            parts = gather_object(parts)
        pos = np.concatenate([p["position"] for p in parts])
        _, first = np.unique(pos, return_index=True)  # even_batches may repeat items on the last batch
        order = first[np.argsort(pos[first])]
        out = {k: np.concatenate([p[k] for p in parts])[order] for k in ("position", "fused_scores", "fused_losses")}
        crop_pos = np.concatenate([p["crop_position"] for p in parts])
        crop_keep = _dedupe_crops(parts)
        out["crop_position"] = crop_pos[crop_keep]
        out["crop_scores"] = np.concatenate([p["crop_scores"] for p in parts])[crop_keep]
        out["crop_losses"] = np.concatenate([p["crop_losses"] for p in parts])[crop_keep]
        if len(out["position"]) != len(self.protocol.validation):
            raise RuntimeError(f"scored {len(out['position'])} of {len(self.protocol.validation)} validation images")
        return out

    def score(self, k: int, pred: dict[str, np.ndarray]) -> dict[str, Any]:
        protocol = self.protocol
        val = protocol.validation
        labels, scores = val.labels, pred["fused_scores"]
        thr = float(self.method.trainer.get("threshold", 0.5))
        row: dict[str, Any] = {
            "window": k,
            "generators": list(protocol.timeline.windows[k]),
            "next_is_fallback": k == protocol.n_windows - 1,
        }
        for name, mask in protocol.subsets(k).items():
            row[name] = subset_metrics(labels[mask], scores[mask], thr)
        row["per_generator_auroc"] = {
            g: auroc(labels[m], scores[m])
            for g in protocol.timeline.generators
            for m in [subset_mask(val.generator_ids, protocol.pairing, [protocol.timeline.generator_id(g)])]
        }
        row["all"] = subset_metrics(labels, scores, thr)
        return row

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> Report:
        protocol, acc, ctx = self.protocol, self.acc, self.ctx
        model: Detector = build(OmegaConf.create(self.method.model_cfg))
        start = self._restore(model)
        model_p = acc.prepare_model(model)  # once: device placement, DDP and autocast wrapping
        n = protocol.n_windows
        t_start = time.perf_counter()
        for k in range(start, n):
            stats = self.train_window(model_p, model, k)
            pred = self.predict(model_p)
            row = self.score(k, pred) | stats
            self.per_window.append(row)
            if acc.is_main_process and self.method.dump:
                path = dump_predictions(ctx.output_dir / "predictions" / f"window_{k}", protocol, pred)
                ctx.tracker.log_artifact(path, f"predictions/window_{k}")
            metrics = {f"window/{s}/{m}": row[s][m] for s in SUBSETS for m in ("auroc", "balanced_accuracy")}
            metrics |= {f"window/{s}/precision": row[s]["precision"] for s in SUBSETS}
            metrics |= {f"window/{s}/recall": row[s]["recall"] for s in SUBSETS}
            metrics |= {f"generator_auroc/{metric_key(g)}": v for g, v in row["per_generator_auroc"].items()}
            metrics |= {"window/train_loss": stats["train_loss"]}
            ctx.tracker.log_metrics(metrics, step=k)
            log.info(
                "after window %d: AUROC next %.4f, growing %.4f, whole %.4f",
                k,
                row["next"]["auroc"],
                row["growing"]["auroc"],
                row["whole"]["auroc"],
            )
            self._save(model, k)
            if ctx.stop_after_task is not None and k == ctx.stop_after_task and k < n - 1:
                log.warning("stop_after_task=%d: stopping after the checkpoint of window %d", k, k)
                return self._report(completed=False, seconds=time.perf_counter() - t_start)
        return self._report(completed=True, seconds=time.perf_counter() - t_start)

    def _report(self, *, completed: bool, seconds: float) -> Report:
        protocol, ctx = self.protocol, self.ctx
        n = protocol.n_windows
        nxt = [float(w["next"]["auroc"]) for w in self.per_window]
        score = benchmark_score(nxt) if completed else _partial_score(nxt, n)
        results: dict[str, Any] = {
            "method": self.method.name,
            "data": protocol.name,
            "data_source": protocol.source,
            "seed": ctx.seed,
            "model": self.method.model_cfg.get("name"),
            "completed": completed,
            "score": score,
            "score_definition": "mean Next-Period AUROC over windows 0..K-2 (the last window has no future)",
            "windows": [list(w) for w in protocol.timeline.windows],
            "generator_id_to_name": list(protocol.timeline.id_to_name),
            "next_auroc": nxt,
            "growing_auroc": [float(w["growing"]["auroc"]) for w in self.per_window],
            "whole_auroc": [float(w["whole"]["auroc"]) for w in self.per_window],
            "per_window": self.per_window,
            "global_batch_size": self.global_batch,
            "train_variants": self.method.train_variants,
            "accumulation_steps": self.accum,
            "train_seconds_this_process": seconds,
            "data_info": {k: v for k, v in protocol.info.items() if k.endswith("sha256") or k == "eval_pipeline"},
        }
        metrics: dict[str, float] = {}
        if self.per_window:
            last = self.per_window[-1]
            metrics = {
                "final/score": score,
                "final/growing_auroc": float(last["growing"]["auroc"]),
                "final/whole_auroc": float(last["whole"]["auroc"]),
                "final/all_auroc": float(last["all"]["auroc"]),
            }
        artifacts: list[Path] = []
        if self.acc.is_main_process and self.per_window and self.method.dump:
            preds = {
                w["window"]: load_predictions(ctx.output_dir / "predictions" / f"window_{w['window']}")
                for w in self.per_window
            }
            artifacts = window_plots(ctx.output_dir / "plots", protocol, self.per_window, preds, title=self._title())
        lines = [f"AI-GenBench ({protocol.source}) {self.method.model_cfg.get('name')}: AUROC after each window"]
        lines.append(f"{'window':>8} {'next':>8} {'growing':>8} {'whole':>8}")
        for w in self.per_window:
            flag = "*" if w["next_is_fallback"] else " "
            lines.append(
                f"{w['window']:>8} {w['next']['auroc']:>7.4f}{flag} {w['growing']['auroc']:>8.4f} "
                f"{w['whole']['auroc']:>8.4f}"
            )
        lines.append(f"score (mean Next-Period AUROC, windows 0..{n - 2}): {score:.4f}   (* = fallback, not scored)")
        return Report(metrics, results, artifacts, "\n".join(lines), completed)

    def _title(self) -> str:
        p = self.protocol
        return f"{self.method.model_cfg.get('name')} on {p.name} ({p.source}, seed {self.ctx.seed})"


def _partial_score(next_aurocs: list[float], n_windows: int) -> float:
    scored = next_aurocs[: n_windows - 1]
    return float(np.mean(scored)) if scored else math.nan


def _dedupe_crops(parts: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Indices of the crops of each image's first occurrence (duplicates come from even batches)."""
    crop_pos = np.concatenate([p["crop_position"] for p in parts])
    image_of_part = np.concatenate([np.full(len(p["crop_position"]), i) for i, p in enumerate(parts)])
    first_part: dict[int, int] = {}
    for i, p in enumerate(parts):
        for q in np.unique(p["position"]).tolist():
            first_part.setdefault(q, i)
    keep = np.fromiter(
        (first_part[int(q)] == int(b) for q, b in zip(crop_pos, image_of_part, strict=True)),
        dtype=bool,
        count=len(crop_pos),
    )
    idx = np.flatnonzero(keep)
    return idx[np.argsort(crop_pos[idx], kind="stable")]
