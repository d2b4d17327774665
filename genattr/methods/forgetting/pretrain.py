"""Pre-train a forgetting backbone (``method=pretrain``) and the cached twin backbone.

The Face Transformer is trained with plain CE on CosFace logits (margin applied to the
ground truth, as in training), AdamW and a cosine schedule (``train_own.py``). The same
function makes the twin's backbone once and caches it under ``paths.cache_dir`` keyed by
everything that shapes it, so twin runs start from a model that already knows every
identity -- the starting point the forgetting claims are about.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from genattr.engine.optim import param_groups
from genattr.engine.schedule import epoch_lr, set_lr
from genattr.methods.base import Report, RunContext
from genattr.utils.errors import ConfigError
from genattr.utils.instantiate import build
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
    twin_arch = cfg.get("twin_arch")
    if protocol.source == "twin" and twin_arch and cfg.get("weights") is None:
        cfg.update(dict(twin_arch))
        log.warning("twin data: model.twin_arch applied to %s: %s", model_cfg.get("name"), dict(twin_arch))
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
) -> dict[str, Any]:
    """Train every parameter of ``net`` with CE on (margin) logits; return the last epoch's loss and the pick.

    ``lr_schedule: step`` = linear warm-up from 0 then cosine to 0, per step (the twin recipe: a
    short one-cycle); ``epoch`` = ``train/train_own.py``: timm's cosine stepped before each
    epoch (warm-up from ``warmup_lr``, floor ``min_lr``). ``select: best_test`` keeps the
    weights with the highest margin test accuracy, evaluated every ``eval_every`` steps (the
    original's ``VER_FREQ`` 20 and its best-accuracy checkpoint); ``last`` keeps the end.
    """
    if lr_schedule not in PRETRAIN_SCHEDULES:
        raise ConfigError(f"method.lr_schedule={lr_schedule} is unknown; choose one of {list(PRETRAIN_SCHEDULES)}")
    if select not in PRETRAIN_SELECT:
        raise ConfigError(f"method.select={select} is unknown; choose one of {list(PRETRAIN_SELECT)}")
    if select == "best_test" and (test is None or eval_every < 1):
        raise ConfigError("method.select=best_test needs the test split and method.eval_every >= 1")
    net.to(device).train()
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=len(train) > batch_size, generator=gen)
    opt = torch.optim.AdamW(param_groups(net.named_parameters(), weight_decay))
    total = max(1, epochs * len(loader))
    warm = warmup_epochs * len(loader)
    step, mean = 0, float("nan")
    best: dict[str, Any] = {"acc": -1.0, "step": None, "state": None}
    for epoch in range(epochs):
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
                    (step + 1) / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm)))
                )
                for g in opt.param_groups:
                    g["lr"] = lr * scale
            x, y = x.to(device), y.to(device)
            logits, _ = net(x, y)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if select == "best_test" and (step + 1) % eval_every == 0 and step != 0:
                acc = accuracy(net, test, margin=True, device=device)
                net.train()
                if acc > best["acc"]:
                    best = {"acc": acc, "step": step + 1, "state": state_dict_cpu(net)}
            step += 1
        mean = float(np.mean(losses))
        if log_fn is not None:
            log_fn({"pretrain/loss": mean, "pretrain/lr": opt.param_groups[0]["lr"]}, epoch)
        log.info("pretrain epoch %d/%d: loss %.4f", epoch + 1, epochs, mean)
    picked = {"final_loss": mean, "select": select, "lr_schedule": lr_schedule}
    if select == "best_test" and best["state"] is not None:
        net.load_state_dict(best["state"])
        picked.update(best_test_acc_margin=best["acc"], best_step=best["step"])
        log.info("pretrain: kept the step-%d weights (margin test accuracy %.2f%%)", best["step"], best["acc"])
    net.eval()
    return picked


@torch.no_grad()
def accuracy(net: nn.Module, data: Dataset, *, margin: bool, device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy (%) of ``net`` on ``data``; ``margin`` passes labels to the head (original eval)."""
    net.eval()
    hit = n = 0
    for x, y in DataLoader(data, batch_size=256):
        x, y = x.to(device), y.to(device)
        logits, _ = net(x, y if margin else None)
        hit += int((logits.argmax(1) == y).sum())
        n += len(y)
    return 100.0 * hit / max(n, 1)


def twin_backbone(model_cfg: Mapping[str, Any], protocol: Any, device: torch.device) -> nn.Module:
    """The twin's pre-trained backbone: from the cache, or trained on the twin's train split once."""
    recipe = dict(model_cfg.get("twin_pretrain") or {})
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
    cache = Path(str(model_cfg.get("cache_dir") or os.environ.get("GENATTR_CACHE", "~/.cache/genattr"))).expanduser()
    out = cache / "forgetting_twin_backbones" / f"{arch.get('name', 'net')}-{key}.safetensors"
    net = build_net(model_cfg, protocol, weights=False)
    if out.is_file():
        net.load_state_dict(load_file(str(out)))
        log.info("twin backbone from cache: %s", out)
        return net.to(device)
    log.warning("pre-training the twin backbone once (cached at %s)", out)
    t0 = time.perf_counter()
    torch.manual_seed(int(recipe.get("seed", 0)))
    net = build_net(model_cfg, protocol, weights=False)
    pretrain(
        net,
        decode_all(protocol.train),
        epochs=int(recipe.get("epochs", 30)),
        batch_size=int(recipe.get("batch_size", 64)),
        lr=float(recipe.get("lr", 2e-3)),
        weight_decay=float(recipe.get("weight_decay", 0.05)),
        warmup_epochs=int(recipe.get("warmup_epochs", 3)),
        seed=int(recipe.get("seed", 0)),
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
        supports: tuple[str, ...] | list[str] = ("forgetting",),
        epochs: int = 1200,
        batch_size: int = 480,
        lr: float = 3e-4,
        weight_decay: float = 0.05,
        warmup_epochs: int = 10,
        warmup_lr: float = 1e-6,
        min_lr: float = 1e-5,
        lr_schedule: str = "epoch",
        select: str = "best_test",
        eval_every: int = 20,
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
        device = ctx.accelerator.device
        self.model_cfg = effective_model_cfg(self.model_cfg, protocol)
        net = build_net(self.model_cfg, protocol, weights=False).to(device)
        if protocol.source == "twin":  # the twin's own recipe, the one its cached backbone uses
            twin = dict(self.model_cfg.get("twin_pretrain") or {})
            self.recipe = {k: type(v)(twin.get(k, v)) for k, v in self.recipe.items()}
            self.recipe.update(lr_schedule="step", select="last")
            log.warning("method=pretrain on the twin: using model.twin_pretrain %s", self.recipe)
        log.info(
            "pretrain: %s LR schedule (method.lr_schedule), keeping the %s weights (method.select)",
            self.recipe["lr_schedule"],
            self.recipe["select"],
        )
        t0 = time.perf_counter()
        picked = pretrain(
            net,
            protocol.train,
            seed=ctx.seed,
            device=device,
            log_fn=ctx.tracker.log_metrics,
            test=protocol.test,
            **self.recipe,
        )
        results = {
            "method": self.name,
            "data": protocol.name,
            "data_source": protocol.source,
            "seed": ctx.seed,
            **picked,
            "test_acc": accuracy(net, protocol.test, margin=False, device=device),
            "test_acc_margin": accuracy(net, protocol.test, margin=True, device=device),
            "train_seconds": time.perf_counter() - t0,
            "params": sum(p.numel() for p in net.parameters()),
            **self.recipe,
        }
        artifacts = []
        if ctx.accelerator.is_main_process:
            path = ctx.output_dir / "backbone.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(state_dict_cpu(net), str(path))
            results["weights"] = str(path)
        summary = (
            f"pretrained {self.model_cfg.get('name')} on {protocol.name}: test accuracy {results['test_acc']:.2f}% "
            f"({results['test_acc_margin']:.2f}% with the CosFace margin); weights: {results.get('weights')}"
        )
        return Report(
            metrics={"pretrain/test_acc": results["test_acc"], "pretrain/test_acc_margin": results["test_acc_margin"]},
            results=results,
            artifacts=artifacts,
            summary=summary,
        )
