"""The AI-GenBench detector: cumulative training over chronological windows, scored after each.

Window k trains on windows 0..k (``cumulative``) for one epoch of ``augmentation_factor``
fixed variants per image (seeded by the image's position in the original's list
``[window k, k-1, ..., 0]``, so older images get new variants in every window; the logged
flag ``train_variants=kept`` keeps each image's first variants instead), starting from
window k-1's final weights with a *new* SGD and OneCycleLR schedule (the original starts
a fresh Lightning ``fit`` per window and loads only the state dict). After every window
the whole validation split goes through the mandatory pipeline and is scored on the Next /
Growing / Whole subsets.

The windows are the stages of the engine (:mod:`genattr.engine.stages`): it restores the last finished window
(with the RNG state), checkpoints each one atomically and stops after ``stop_after_task``. Training goes through
:func:`genattr.engine.training.prepared` / :func:`~genattr.engine.training.optimizer_step`, with Accelerate's
gradient accumulation up to the global batch.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch.nn import functional as F
from torch.utils.data import DataLoader

from genattr.data.aigenbench.augment import mandatory_eval_pipeline, train_pipeline
from genattr.data.aigenbench.crops import check_crop
from genattr.data.aigenbench.dataset import DetectionProtocol
from genattr.data.aigenbench.splits import subset_mask
from genattr.data.aigenbench.views import EvalSet, FixedAugmentedTrainSet, collate_crops
from genattr.engine.progress import track
from genattr.engine.stages import StagedRun
from genattr.engine.training import optimizer_step, per_process, prepared
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
#: the checkpoint's weights file (the trainable state only: the head of a probe, everything of a tune)
WEIGHTS = "model.safetensors"


def metric_key(name: str) -> str:
    """MLflow accepts only alphanumerics, ``_-. /`` in metric names (generator names have parentheses)."""
    return re.sub(r"[^0-9A-Za-z_\-. /]", "_", name)


class SlidingWindowDetector:
    """``method=detector``: a binary detector trained window by window (see module docstring).

    Every option comes from ``conf/method/detector.yaml`` (no defaults here; ``supports`` is a meta key that
    ``build`` keeps for the compatibility check, so the constructor names it for the Method protocol)."""

    def __init__(
        self,
        *,
        name: str,
        model: Mapping[str, Any],
        trainer: Mapping[str, Any],
        supports: tuple[str, ...] | list[str] = ("detection",),
        augmentation_factor: int,
        train_aug: str,
        train_crop: str,
        eval_crop: str,
        train_variants: str,
        dump_predictions: bool,
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

    def run(self, protocol: DetectionProtocol, ctx: RunContext) -> Report:
        return WindowLoop(self, protocol, ctx).run()


def sgd(model: Detector, optimizer: Mapping[str, Any]) -> torch.optim.SGD:
    """SGD over the trainable parameters (``trainer.optimizer``)."""
    return torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad],
        lr=float(optimizer["lr"]),
        momentum=float(optimizer["momentum"]),
        dampening=float(optimizer["dampening"]),
        weight_decay=float(optimizer["weight_decay"]),
    )


def one_cycle(
    opt: torch.optim.Optimizer, steps: int, *, max_lr: float, schedule: Mapping[str, Any]
) -> torch.optim.lr_scheduler.OneCycleLR:
    """torch OneCycleLR over ``steps`` optimizer steps (``trainer.schedule``); ``cycle_momentum`` overrides SGD's
    momentum (0.95 -> 0.85 -> 0.95)."""
    return torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=float(max_lr),
        total_steps=steps,
        pct_start=float(schedule["pct_start"]),
        anneal_strategy=str(schedule["anneal_strategy"]),
        cycle_momentum=bool(schedule["cycle_momentum"]),
        base_momentum=float(schedule["base_momentum"]),
        max_momentum=float(schedule["max_momentum"]),
        div_factor=float(schedule["div_factor"]),
        final_div_factor=float(schedule["final_div_factor"]),
    )


@contextmanager
def accumulating(acc: Accelerator, steps: int) -> Iterator[None]:
    """Accelerate's gradient accumulation over ``steps`` micro-batches for one stage (the Accelerator's own
    setting, put back afterwards): ``acc.backward`` divides each micro-batch's loss by ``steps``; the processes
    all-reduce and the optimizer steps once every ``steps`` micro-batches."""
    before = acc.gradient_accumulation_steps
    acc.gradient_accumulation_steps = int(steps)
    try:
        yield
    finally:
        acc.gradient_accumulation_steps = before


class WindowLoop:
    """The detector on the engine: one stage per window (train, score, dump); holds the model and the results."""

    stage_kind = "window"

    def __init__(self, method: SlidingWindowDetector, protocol: DetectionProtocol, ctx: RunContext) -> None:
        self.method, self.protocol, self.ctx = method, protocol, ctx
        self.acc = ctx.accelerator
        self.tr = tr = method.trainer
        self.size = int(method.model_cfg["input_size"])
        self.global_batch = int(tr["global_batch_size"])
        self.micro = int(tr["batch_size"])
        world = self.acc.num_processes
        if self.global_batch % (self.micro * world):
            raise ConfigError(
                f"trainer.global_batch_size={self.global_batch} is not a multiple of trainer.batch_size={self.micro} "
                f"x {world} process(es); the global batch is reached by gradient accumulation, so choose a "
                "per-process batch_size that divides it"
            )
        if int(tr["grad_accum"]) != 1:
            raise ConfigError(
                f"trainer.grad_accum={tr['grad_accum']}: the detector derives its accumulation from "
                "trainer.global_batch_size / (trainer.batch_size x processes); leave trainer.grad_accum at 1"
            )
        self.accum = self.global_batch // (self.micro * world)
        self.workers = int(tr["num_workers"])
        cache = bool(tr["cache_images"]) and self.workers == 0
        self.train_cache: dict | None = {} if cache else None
        self.eval_cache: dict | None = {} if cache else None
        ev = protocol.info["eval_pipeline"]
        self.eval_pipeline = mandatory_eval_pipeline(**ev)
        self.train_pipeline = train_pipeline(method.train_aug, jpeg_quality=ev["jpeg_quality"])
        self.per_window: list[dict[str, Any]] = []
        self.global_step = 0
        #: what this process did in this session (results.json ``per_process``): samples trained on, images scored
        self.seen = 0
        self.scored = 0
        self.t_start = time.perf_counter()
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
        self.model: Detector = build(OmegaConf.create(method.model_cfg))

    # -- training -----------------------------------------------------------------------------
    def train_window(self, k: int) -> dict[str, float]:
        """One window: new SGD + OneCycleLR over this window's optimizer steps, weights carried over."""
        protocol, acc, tr, model = self.protocol, self.acc, self.tr, self.model
        # the window's own seed: a resumed window draws exactly what it drew in one go
        seed_everything(self.ctx.seed * 1009 + k, deterministic=bool(tr["deterministic"]))
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
        epochs = int(tr["epochs_per_window"])
        clip = tr["grad_clip"]
        log_every = max(1, int(tr["log_every_steps"]))
        opt = sgd(model, tr["optimizer"])
        losses: list[float] = []
        with accumulating(acc, self.accum), prepared(acc, model, opt, loader) as p:
            per_epoch = len(p.loader) // self.accum  # an incomplete last accumulation group is dropped
            steps = per_epoch * epochs
            if per_epoch < 1:
                raise ConfigError(
                    f"window {k} has {len(data)} training samples, fewer than one global batch of "
                    f"{self.global_batch}; lower trainer.global_batch_size"
                )
            # left unprepared on purpose: Accelerate's prepared scheduler steps once per process per optimizer
            # step (for schedules counted in unsharded batches); this one counts optimizer steps
            p.scheduler = sched = one_cycle(opt, steps, max_lr=tr["optimizer"]["lr"], schedule=tr["schedule"])
            p.model.train()
            t0 = time.perf_counter()
            # epochs re-visit the same augmentation_factor fixed variants, reshuffled (as the original)
            for epoch in range(epochs):
                micro_batches = track(
                    itertools.islice(p.loader, per_epoch * self.accum),
                    desc=f"window {k} epoch {epoch + 1}/{epochs}",
                    total=per_epoch * self.accum,
                    unit="batch",
                    main_process=acc.is_main_process,
                )
                total = 0.0
                for x, y, _, _ in micro_batches:
                    loss = optimizer_step(acc, p, _bce(x, y), clip_norm=None if clip is None else float(clip))
                    total += float(loss / self.accum)  # this process's share of the global batch's mean
                    self.seen += len(y)
                    if not acc.sync_gradients:
                        continue
                    losses.append(total)
                    total = 0.0
                    self.global_step += 1
                    if len(losses) % log_every == 0 or len(losses) == steps:
                        self.ctx.tracker.log_metrics(
                            {"train/loss": self._mean(losses[-log_every:]), "train/lr": sched.get_last_lr()[0]},
                            step=self.global_step,
                        )
                    if p.capped:  # trainer.max_steps
                        break
                if p.capped:
                    break
            seconds = time.perf_counter() - t0
            steps = len(losses)
        _share_buffers(acc, model)
        train_loss = self._mean(losses)
        log.info("window %d: %d optimizer steps, loss %.4f, %.1f s", k, steps, train_loss, seconds)
        return {
            "train_loss": train_loss,
            "optimizer_steps": steps,
            "train_samples": len(data),
            "train_seconds": seconds,
        }

    def _mean(self, losses: list[float]) -> float:
        """The mean loss of the global batches: this process's mean of its micro-batches, averaged over the
        processes (every process calls this at the same steps)."""
        local = torch.tensor(float(np.mean(losses)), dtype=torch.float64, device=self.acc.device)
        return float(self.acc.reduce(local, "mean"))

    # -- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, k: int) -> dict[str, np.ndarray]:
        """Fused (mean sigmoid over crops) and per-crop scores of every validation image, each process scoring
        its share of the images and every process getting all scores back."""
        acc, model = self.acc, self.model
        data = EvalSet(
            self.protocol.validation,
            pipeline=self.eval_pipeline,
            crop=self.method.eval_crop,
            size=self.size,
            cache=self.eval_cache,
        )
        loader = DataLoader(
            data,
            batch_size=int(self.tr["eval_batch_size"]),
            shuffle=False,
            num_workers=self.workers,
            collate_fn=collate_crops,
        )
        loader_p = acc.prepare_data_loader(loader)
        model.to(acc.device).eval()
        parts: list[dict[str, np.ndarray]] = []
        for batch in track(loader_p, desc=f"window {k} scoring", unit="batch", main_process=acc.is_main_process):
            with acc.autocast():
                logits = model(batch["crops"]).float()
            idx = batch["crop_to_image_index"]
            crop_labels = batch["label"][idx].float()
            crop_scores = torch.sigmoid(logits)
            crop_losses = F.binary_cross_entropy_with_logits(logits, crop_labels, reduction="none")
            n = len(batch["label"])
            counts = torch.zeros(n, device=logits.device).index_add_(0, idx, torch.ones_like(crop_scores))
            fused = torch.zeros(n, device=logits.device).index_add_(0, idx, crop_scores) / counts
            fused_loss = torch.zeros(n, device=logits.device).index_add_(0, idx, crop_losses) / counts
            self.scored += n
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
        thr = float(self.tr["threshold"])
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

    # -- the engine's stages: one per window ------------------------------------------------------
    def stage_names(self) -> list[str]:
        return ["+".join(w) for w in self.protocol.timeline.windows]

    def identity(self) -> dict[str, Any]:
        return {"windows": [list(w) for w in self.protocol.timeline.windows]}

    def run_stage(self, k: int) -> dict[str, float]:
        protocol, ctx = self.protocol, self.ctx
        stats = self.train_window(k)
        pred = self.predict(k)
        row = self.score(k, pred) | stats
        self.per_window.append(row)
        if self.acc.is_main_process and self.method.dump:
            path = dump_predictions(ctx.output_dir / "predictions" / f"window_{k}", protocol, pred)
            ctx.tracker.log_artifact(path, f"predictions/window_{k}")
        metrics = {f"window/{s}/{m}": row[s][m] for s in SUBSETS for m in ("auroc", "balanced_accuracy")}
        metrics |= {f"window/{s}/precision": row[s]["precision"] for s in SUBSETS}
        metrics |= {f"window/{s}/recall": row[s]["recall"] for s in SUBSETS}
        metrics |= {f"generator_auroc/{metric_key(g)}": v for g, v in row["per_generator_auroc"].items()}
        metrics |= {"window/train_loss": stats["train_loss"]}
        log.info(
            "after window %d: AUROC next %.4f, growing %.4f, whole %.4f",
            k,
            row["next"]["auroc"],
            row["growing"]["auroc"],
            row["whole"]["auroc"],
        )
        return metrics

    def checkpoint(self, k: int) -> tuple[Callable[[Path], None], dict[str, Any]]:
        weights = self.model.trainable_state()
        state = {"per_window": self.per_window, "global_step": self.global_step, "model": self.method.model_cfg["name"]}
        return lambda folder: save_file(weights, str(folder / WEIGHTS)), state

    def restore(self, folder: Path, state: Mapping[str, Any]) -> None:
        self.model.load_trainable_state(load_file(str(folder / WEIGHTS)))
        self.per_window = list(state["per_window"])
        self.global_step = int(state["global_step"])

    def run(self) -> Report:
        return StagedRun(self, self.ctx, title=self._title()).run()

    def report(self, *, completed: bool, last: int) -> Report:
        protocol, ctx = self.protocol, self.ctx
        n = protocol.n_windows
        name = self.method.model_cfg["name"]
        nxt = [float(w["next"]["auroc"]) for w in self.per_window]
        score = benchmark_score(nxt) if completed else _partial_score(nxt, n)
        results: dict[str, Any] = {
            "method": self.method.name,
            "data": protocol.name,
            "data_source": protocol.source,
            "seed": ctx.seed,
            "model": name,
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
            "train_seconds_this_process": time.perf_counter() - self.t_start,
            "data_info": {k: v for k, v in protocol.info.items() if k.endswith("sha256") or k == "eval_pipeline"},
            # what each process did in this session: the training samples of its micro-batches, the validation
            # images it scored (its share of the sharded loader, the even-batches padding included)
            "per_process": {
                "train_samples": per_process(self.acc, self.seen),
                "scored_images": per_process(self.acc, self.scored),
            },
        }
        metrics: dict[str, float] = {}
        if self.per_window:
            final = self.per_window[-1]
            metrics = {
                "final/score": score,
                "final/growing_auroc": float(final["growing"]["auroc"]),
                "final/whole_auroc": float(final["whole"]["auroc"]),
                "final/all_auroc": float(final["all"]["auroc"]),
            }
        artifacts: list[Path] = []
        if self.acc.is_main_process and self.per_window and self.method.dump:
            preds = {
                w["window"]: load_predictions(ctx.output_dir / "predictions" / f"window_{w['window']}")
                for w in self.per_window
            }
            artifacts = window_plots(ctx.output_dir / "plots", protocol, self.per_window, preds, title=self._title())
        lines = [f"AI-GenBench ({protocol.source}) {name}: AUROC after each window"]
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
        return f"{self.method.model_cfg['name']} on {p.name} ({p.source}, seed {self.ctx.seed})"


def _bce(x: torch.Tensor, y: torch.Tensor) -> Callable[[torch.nn.Module], torch.Tensor]:
    """The training loss of one micro-batch on the prepared model (one logit per image, BCE with logits)."""
    return lambda model: F.binary_cross_entropy_with_logits(model(x).float(), y.float())


def _share_buffers(acc: Accelerator, model: torch.nn.Module) -> None:
    """Give every process the main process's buffers (BatchNorm statistics) after training.

    Under DDP each process updates its running statistics with its own batches (DDP broadcasts the main
    process's before every training forward); the checkpoint holds the main process's, so every process
    scores with those, as a resumed run does."""
    if acc.num_processes > 1:
        from accelerate.utils import broadcast

        broadcast(list(model.buffers()), from_process=0)


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
