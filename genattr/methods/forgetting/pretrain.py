"""Pre-train a forgetting backbone (``method=pretrain``) and the cached twin backbone.

The Face Transformer is trained with plain CE on CosFace logits (margin applied to the
ground truth, as in training), AdamW and a cosine schedule (``train_own.py``). The same
function makes the twin's backbone once and caches it under ``paths.cache_dir`` keyed by
everything that shapes it, so twin runs start from a model that already knows every
identity -- the starting point the forgetting claims are about.

``method=pretrain`` is one stage of the engine (:mod:`genattr.engine.stages`: a finished run
is not trained again, its checkpoint holds the weights) and trains through Accelerate
(prepared model and optimiser, autocast, the batches shared out among the processes). The
twin backbone is part of the synthetic twin and still trains in plain fp32 torch outside the
run's Accelerator (``acc=None``): its cache key does not hold the precision.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from genattr.engine.optim import param_groups
from genattr.engine.progress import track
from genattr.engine.schedule import epoch_lr, set_lr
from genattr.engine.stages import StagedRun
from genattr.engine.training import optimizer_step, prepared, shard
from genattr.methods.base import Report, RunContext
from genattr.methods.forgetting.base import check_one_step_per_batch, process_rows
from genattr.utils.errors import ConfigError
from genattr.utils.instantiate import build
from genattr.utils.io import cache_dir
from genattr.utils.weights import state_dict_cpu

log = logging.getLogger(__name__)

RECIPE_VERSION = 1
#: model-config keys that are not architecture (never passed to the builder)
NON_ARCH_KEYS = ("twin_pretrain", "cache_dir", "twin_arch")


def effective_model_cfg(model_cfg: Mapping[str, Any], protocol: Any) -> dict[str, Any]:
    """The model config with its ``twin_arch`` applied when the data is a twin.

    A model option picked by hand (``model=vit_b16_imagenet100``) is exempt from the data
    option's twin profile, so the option itself names the CPU-sized variant it becomes on a
    twin (a tiny ViT on 32 px images); real data never sees it.
    """
    cfg = dict(model_cfg)
    twin_arch = cfg.get("twin_arch")  # only the options a twin shrinks have one
    if protocol.source == "twin" and twin_arch and cfg["weights"] is None:
        cfg.update(dict(twin_arch))
        log.warning("twin data: model.twin_arch applied to %s: %s", model_cfg["name"], dict(twin_arch))
    return cfg


def build_net(model_cfg: Mapping[str, Any], protocol: Any, *, weights: str | None | bool = True) -> nn.Module:
    """Build the model node for ``protocol`` (classes, ImageNet ids); ``weights=False`` = random init."""
    from omegaconf import OmegaConf

    cfg = {k: v for k, v in model_cfg.items() if k not in NON_ARCH_KEYS}
    if weights is False:
        cfg["weights"] = None
        if "pretrained" in cfg:
            cfg["pretrained"] = False
    return build(OmegaConf.create(cfg), num_classes=protocol.n_classes, class_ids=protocol.info.get("imagenet_ids"))


def decode_all(ds: Dataset) -> TensorDataset:
    """Decode a (small) image dataset into memory once, so epochs do not re-read the files."""
    xs, ys = zip(*(ds[i] for i in range(len(ds))), strict=True)
    return TensorDataset(torch.stack(xs), torch.as_tensor(ys, dtype=torch.long))


PRETRAIN_SCHEDULES = ("step", "epoch")
PRETRAIN_SELECT = ("last", "best_test")


def pretrain(
    net: nn.Module,
    train: Dataset,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.05,
    warmup_epochs: int = 1,
    seed: int = 0,
    device: torch.device | str = "cpu",
    log_fn: Any = None,
    lr_schedule: str = "step",
    warmup_lr: float = 1e-6,
    min_lr: float = 1e-5,
    select: str = "last",
    test: Dataset | None = None,
    eval_every: int = 20,
    acc: Any = None,
) -> dict[str, Any]:
    """Train every parameter of ``net`` with CE on (margin) logits; return the last epoch's loss and the pick.

    ``lr_schedule: step`` = linear warm-up from 0 then cosine to 0, per step (the twin recipe: a
    short one-cycle); ``epoch`` = ``train/train_own.py``: timm's cosine stepped before each
    epoch (warm-up from ``warmup_lr``, floor ``min_lr``). ``select: best_test`` keeps the
    weights with the highest margin test accuracy, evaluated every ``eval_every`` steps (the
    original's ``VER_FREQ`` 20 and its best-accuracy checkpoint); ``last`` keeps the end.

    With ``acc`` (an ``Accelerator``) the steps go through it: the model and optimiser prepared, the
    forward under autocast, every process training on its rows of the same global batches; without
    (the twin backbone, see the module docstring) plain torch on ``device``.
    """
    if lr_schedule not in PRETRAIN_SCHEDULES:
        raise ConfigError(f"method.lr_schedule={lr_schedule} is unknown; choose one of {list(PRETRAIN_SCHEDULES)}")
    if select not in PRETRAIN_SELECT:
        raise ConfigError(f"method.select={select} is unknown; choose one of {list(PRETRAIN_SELECT)}")
    if select == "best_test" and (test is None or eval_every < 1):
        raise ConfigError("method.select=best_test needs the test split and method.eval_every >= 1")
    device = acc.device if acc is not None else device
    net.to(device).train()
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=len(train) > batch_size, generator=gen)
    opt = torch.optim.AdamW(param_groups(net.named_parameters(), weight_decay))
    total = max(1, epochs * len(loader))
    warm = warmup_epochs * len(loader)
    step, mean = 0, float("nan")
    best: dict[str, Any] = {"acc": -1.0, "step": None, "state": None}
    main = acc is None or acc.is_main_process
    with prepared(acc, net, opt) if acc is not None else nullcontext() as p:
        train_step = _plain_step(net, opt) if p is None else _accelerated_step(acc, p)
        for epoch in track(range(epochs), desc="pretrain", unit="epoch", main_process=main):
            losses = []
            if lr_schedule == "epoch":
                set_lr(
                    opt,
                    epoch_lr(
                        epoch,
                        base_lr=lr,
                        epochs=epochs,
                        warmup_epochs=warmup_epochs,
                        warmup_lr=warmup_lr,
                        min_lr=min_lr,
                        step_after_epoch=False,
                    ),
                )
            for x, y in loader:
                if lr_schedule == "step":
                    scale = (
                        (step + 1) / warm
                        if step < warm
                        else 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm)))
                    )
                    for g in opt.param_groups:
                        g["lr"] = lr * scale
                r = process_rows(acc, len(y))
                x, y = x[r.start : r.stop].to(device), y[r.start : r.stop].to(device)
                losses.append(train_step(x, y))
                if select == "best_test" and (step + 1) % eval_every == 0 and step != 0:
                    hit = accuracy(net, test, margin=True, device=device, acc=acc)
                    net.train()
                    if hit > best["acc"]:
                        best = {"acc": hit, "step": step + 1, "state": state_dict_cpu(net)}
                step += 1
                if p is not None and p.capped:  # trainer.max_steps
                    break
            mean = float(np.mean(losses))
            if acc is not None and acc.num_processes > 1:
                mean = float(acc.reduce(torch.tensor(mean, dtype=torch.float64, device=device), "mean"))
            if log_fn is not None:
                log_fn({"pretrain/loss": mean, "pretrain/lr": opt.param_groups[0]["lr"]}, epoch)
            log.info("pretrain epoch %d/%d: loss %.4f", epoch + 1, epochs, mean)
            if p is not None and p.capped:
                break
    picked = {"final_loss": mean, "select": select, "lr_schedule": lr_schedule}
    if select == "best_test" and best["state"] is not None:
        net.load_state_dict(best["state"])
        picked.update(best_test_acc_margin=best["acc"], best_step=best["step"])
        log.info("pretrain: kept the step-%d weights (margin test accuracy %.2f%%)", best["step"], best["acc"])
    net.eval()
    return picked


def _plain_step(net: nn.Module, opt: torch.optim.Optimizer) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """One plain-torch step (the twin backbone only; see the module docstring)."""

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        logits, _ = net(x, y)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def _accelerated_step(acc: Any, p: Any) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """One step through Accelerate (:func:`~genattr.engine.training.optimizer_step`)."""

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        return optimizer_step(acc, p, lambda model: F.cross_entropy(model(x, y)[0], y)).item()

    return step


@torch.no_grad()
def accuracy(
    net: nn.Module, data: Dataset, *, margin: bool, device: torch.device | str = "cpu", acc: Any = None
) -> float:
    """Top-1 accuracy (%) of ``net`` on ``data``; ``margin`` passes labels to the head (original eval).

    With ``acc`` on several processes each one scores its share of ``data`` and the counts are added up.
    """
    net.eval()
    if acc is not None and acc.num_processes > 1:
        data = Subset(data, shard(acc, len(data)))  # type: ignore[arg-type]
    hit = n = 0
    for x, y in DataLoader(data, batch_size=256):
        x, y = x.to(device), y.to(device)
        with acc.autocast() if acc is not None else nullcontext():
            logits, _ = net(x, y if margin else None)
        hit += int((logits.argmax(1) == y).sum())
        n += len(y)
    if acc is not None and acc.num_processes > 1:
        hit, n = (int(v) for v in acc.reduce(torch.tensor([hit, n], device=acc.device), "sum").tolist())
    return 100.0 * hit / max(n, 1)


def twin_backbone(model_cfg: Mapping[str, Any], protocol: Any, device: torch.device) -> nn.Module:
    """The twin's pre-trained backbone: from the cache, or trained on the twin's train split once."""
    recipe = dict(model_cfg["twin_pretrain"])
    arch = {k: v for k, v in model_cfg.items() if k not in NON_ARCH_KEYS}
    key_src = {
        "arch": arch,
        "recipe": recipe,
        "twin": protocol.info.get("twin"),
        "layout": protocol.info.get("layout"),
        "transform": {k: protocol.info.get(k) for k in ("image_size", "resize", "crop")},
        "version": RECIPE_VERSION,
    }
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True, default=str).encode()).hexdigest()[:12]
    cache = cache_dir(model_cfg["cache_dir"])
    out = cache / "forgetting_twin_backbones" / f"{arch['name']}-{key}.safetensors"
    net = build_net(model_cfg, protocol, weights=False)
    if out.is_file():
        net.load_state_dict(load_file(str(out)))
        log.info("twin backbone from cache: %s", out)
        return net.to(device)
    log.warning("pre-training the twin backbone once (cached at %s)", out)
    t0 = time.perf_counter()
    # on its own RNG: the run goes on from the global RNG state a cached backbone leaves (one build), so a
    # run that had to train the twin first ends with the same results as one that found it in the cache
    dev = torch.device(device)
    with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
        torch.manual_seed(int(recipe["seed"]))
        net = build_net(model_cfg, protocol, weights=False)
        pretrain(
            net,
            decode_all(protocol.train),
            epochs=int(recipe["epochs"]),
            batch_size=int(recipe["batch_size"]),
            lr=float(recipe["lr"]),
            weight_decay=float(recipe["weight_decay"]),
            warmup_epochs=int(recipe["warmup_epochs"]),
            seed=int(recipe["seed"]),
            device=device,
        )
        acc = accuracy(net, decode_all(protocol.test), margin=False, device=device)
    log.warning("twin backbone pre-trained in %.0fs: test accuracy %.1f%% (argmax)", time.perf_counter() - t0, acc)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".tmp")
    os.close(fd)
    save_file(state_dict_cpu(net), tmp, metadata={"key": json.dumps(key_src, default=str), "test_acc": f"{acc:.2f}"})
    os.replace(tmp, out)
    return net


class Pretrain:
    """``method=pretrain``: train the backbone on the full train split, write ``backbone.safetensors``.

    The file is what ``model.weights`` takes for the forgetting methods.
    """

    def __init__(
        self,
        *,
        name: str,
        model: Mapping[str, Any],
        trainer: Mapping[str, Any],
        supports: tuple[str, ...] | list[str] = ("forgetting",),  # a meta key: the config check reads it
        epochs: int,
        batch_size: int,
        lr: float,
        weight_decay: float,
        warmup_epochs: int,
        warmup_lr: float,
        min_lr: float,
        lr_schedule: str,
        select: str,
        eval_every: int,
        bnd: float | None = None,
    ) -> None:
        # ``bnd`` is accepted only because the data option's twin profile sets it for every
        # forgetting method; pre-training has no forgetting term.
        self.name = name
        self.supports = tuple(supports)
        self.model_cfg = dict(model)
        self.trainer = dict(trainer)
        self.recipe = dict(
            epochs=int(epochs),
            batch_size=int(batch_size),
            lr=float(lr),
            weight_decay=float(weight_decay),
            warmup_epochs=int(warmup_epochs),
            warmup_lr=float(warmup_lr),
            min_lr=float(min_lr),
            lr_schedule=str(lr_schedule),
            select=str(select),
            eval_every=int(eval_every),
        )

    def run(self, protocol: Any, ctx: RunContext) -> Report:
        self.model_cfg = effective_model_cfg(self.model_cfg, protocol)
        if protocol.source == "twin":  # the twin's own recipe, the one its cached backbone uses
            twin = dict(self.model_cfg["twin_pretrain"])
            self.recipe = {k: type(v)(twin[k]) if k in twin else v for k, v in self.recipe.items()}
            self.recipe.update(lr_schedule="step", select="last")
            log.warning("method=pretrain on the twin: using model.twin_pretrain %s", self.recipe)
        log.info(
            "pretrain: %s LR schedule (method.lr_schedule), keeping the %s weights (method.select)",
            self.recipe["lr_schedule"],
            self.recipe["select"],
        )
        return StagedRun(_PretrainStage(self, protocol, ctx), ctx, title=f"pretrain on {protocol.name}").run()


class _PretrainStage:
    """``method=pretrain`` on the engine: one stage, whose checkpoint holds the trained weights."""

    stage_kind = "stage"

    def __init__(self, method: Pretrain, protocol: Any, ctx: RunContext) -> None:
        self.method, self.protocol, self.ctx = method, protocol, ctx
        self.acc = ctx.accelerator
        check_one_step_per_batch(self.acc)
        self.net = build_net(method.model_cfg, protocol, weights=False).to(self.acc.device)
        self.picked: dict[str, Any] = {}
        self.train_seconds = 0.0

    def stage_names(self) -> list[str]:
        return ["pretrain"]

    def identity(self) -> dict[str, Any]:
        return {"data": self.protocol.name, "n_classes": int(self.protocol.n_classes)}

    def run_stage(self, k: int) -> dict[str, float]:
        t0 = time.perf_counter()
        self.picked = pretrain(
            self.net,
            self.protocol.train,
            seed=self.ctx.seed,
            log_fn=self.ctx.tracker.log_metrics,
            test=self.protocol.test,
            acc=self.acc,
            **self.method.recipe,
        )
        self.train_seconds = time.perf_counter() - t0
        return {"pretrain/final_loss": float(self.picked["final_loss"])}

    def checkpoint(self, k: int) -> tuple[Callable[[Path], None], dict[str, Any]]:
        weights = state_dict_cpu(self.net)
        return lambda folder: save_file(weights, str(folder / "backbone.safetensors")), {
            "picked": self.picked,
            "train_seconds": self.train_seconds,
        }

    def restore(self, folder: Path, state: Mapping[str, Any]) -> None:
        self.net.load_state_dict(load_file(str(folder / "backbone.safetensors")))
        self.picked, self.train_seconds = dict(state["picked"]), float(state["train_seconds"])

    def report(self, *, completed: bool, last: int) -> Report:
        protocol, ctx, net, device = self.protocol, self.ctx, self.net, self.acc.device
        results = {
            "method": self.method.name,
            "data": protocol.name,
            "data_source": protocol.source,
            "seed": ctx.seed,
            **self.picked,
            "test_acc": accuracy(net, protocol.test, margin=False, device=device, acc=self.acc),
            "test_acc_margin": accuracy(net, protocol.test, margin=True, device=device, acc=self.acc),
            "train_seconds": self.train_seconds,
            "params": sum(p.numel() for p in net.parameters()),
            **self.method.recipe,
        }
        if self.acc.is_main_process:
            path = ctx.output_dir / "backbone.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(state_dict_cpu(net), str(path))
            results["weights"] = str(path)
        summary = (
            f"pretrained {self.method.model_cfg['name']} on {protocol.name}: test accuracy {results['test_acc']:.2f}% "
            f"({results['test_acc_margin']:.2f}% with the CosFace margin); weights: {results.get('weights')}"
        )
        return Report(
            metrics={"pretrain/test_acc": results["test_acc"], "pretrain/test_acc_margin": results["test_acc_margin"]},
            results=results,
            artifacts=[],
            summary=summary,
            completed=completed,
        )
