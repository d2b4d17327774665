"""Where the class label of an image comes from when scoring it under class-conditional generators.

The task's images come without their ImageNet class (spec §3), so the likelihood stages need candidates:

* ``oracle``: the true class from the twin's hidden metadata (images without one, e.g. outliers, get the null
  class); an upper bound, impossible on the real task;
* ``null``: the null class only (ℓ_c = ℓ_u);
* ``topk``: the top-k classes of a small timm classifier, trained on generated images with their sampled class
  (the inverse-decoder pairs), or a pretrained ImageNet classifier from a local file (``train: false``);
* ``all``: every class (the twin's "enumerate all K" check; K' = K forward passes per image).

Scores over the K' candidates are then combined with max or log-mean-exp (see ``likelihood.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import timm
import torch
from accelerate import Accelerator
from torch import nn

from genattr.engine.progress import track
from genattr.engine.training import optimizer_step, prepared, shard
from genattr.methods.tracing.parallel import global_batch_mean
from genattr.methods.tracing.signals import to_unit
from genattr.utils.errors import ConfigError

log = logging.getLogger(__name__)
CLASS_SOURCES = ("oracle", "null", "topk", "all")


def build_classifier(cfg: Mapping[str, Any], num_classes: int) -> nn.Module:
    """timm model from ``method.classifier`` (name, pretrained, weights = local file, train)."""
    kwargs: dict[str, Any] = {"pretrained": bool(cfg["pretrained"])}
    if cfg["weights"]:
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(cfg["weights"])})
    if cfg["train"]:
        kwargs["num_classes"] = num_classes
    return timm.create_model(str(cfg["name"]), **kwargs)


def _normalise(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    pc = getattr(model, "pretrained_cfg", {}) or {}
    mean = torch.tensor(pc.get("mean", (0.5, 0.5, 0.5)), device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(pc.get("std", (0.5, 0.5, 0.5)), device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def train_classifier(
    model: nn.Module,
    images: torch.Tensor,
    classes: torch.Tensor,
    *,
    acc: Accelerator,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> tuple[list[float], int]:
    """Cross-entropy training with AdamW and horizontal flips; returns the loss per epoch and the number of
    images this process trained on.

    ``batch_size`` is the global batch: every process draws the same order and flips, trains on its share of
    each batch, and DDP averages the gradients of :func:`global_batch_mean` losses. Batch-norm statistics are
    per share (the timm ResNets' BatchNorm is not synchronised), the one place where N processes differ from one.
    """
    model.to(acc.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    hist, seen, world, device = [], 0, acc.num_processes, acc.device
    with prepared(acc, model, opt) as p:
        for _ in track(range(int(epochs)), desc="class classifier", unit="epoch", main_process=acc.is_main_process):
            order = torch.randperm(len(images), generator=g)
            total = 0.0  # this process's part of the epoch's summed loss
            for s in range(0, len(order), batch_size):
                idx = order[s : s + batch_size]
                flip = torch.rand(len(idx), generator=g) < 0.5
                share = shard(acc, len(idx))
                mine, flip = idx[share.start : share.stop], flip[share.start : share.stop].to(device)
                x = to_unit(images[mine], device)
                x[flip] = x[flip].flip(-1)
                y = classes[mine].to(device)

                def loss_fn(m: nn.Module, x: torch.Tensor = x, y: torch.Tensor = y, n: int = len(idx)) -> torch.Tensor:
                    logits = m(_normalise(p.raw, x))
                    if world == 1:  # the plain mean, as before the engine
                        return nn.functional.cross_entropy(logits, y)
                    return global_batch_mean(nn.functional.cross_entropy(logits, y, reduction="none"), n, world)

                total += float(optimizer_step(acc, p, loss_fn)) * len(idx) / world
                seen += len(mine)
                if p.capped:  # trainer.max_steps
                    break
            if world > 1:
                total = float(acc.reduce(torch.tensor(total, dtype=torch.float64, device=device), "sum"))
            hist.append(total / len(images))
            if p.capped:
                break
    model.eval()
    return hist, seen


@torch.no_grad()
def topk_classes(
    model: nn.Module, images: torch.Tensor, k: int, *, batch_size: int, device: torch.device
) -> np.ndarray:
    """[N, k] most probable classes per image."""
    model.to(device).eval()
    out = []
    for s in range(0, len(images), batch_size):
        logits = model(_normalise(model, to_unit(images[s : s + batch_size], device)))
        out.append(logits.topk(k, dim=1).indices.cpu().numpy())
    return np.concatenate(out).astype(np.int64) if out else np.zeros((0, k), dtype=np.int64)


def candidate_classes(
    source: str,
    n: int,
    *,
    num_classes: int,
    null_class: int,
    oracle: np.ndarray | None = None,
    topk: np.ndarray | None = None,
) -> np.ndarray:
    """[N, K'] candidate class ids per image for ``source`` (oracle: −1 entries become the null class)."""
    if source == "null":
        return np.full((n, 1), null_class, dtype=np.int64)
    if source == "all":
        return np.tile(np.arange(num_classes, dtype=np.int64), (n, 1))
    if source == "oracle":
        if oracle is None:
            raise ConfigError(
                "method.class_source=oracle needs the true classes of the images, which only the twin's hidden "
                "metadata has; use topk or null on the real task"
            )
        cls = np.where(np.asarray(oracle) < 0, null_class, np.asarray(oracle)).astype(np.int64)
        return cls.reshape(n, 1)
    if source == "topk":
        if topk is None:
            raise ValueError("topk candidates were not computed")
        return np.asarray(topk, dtype=np.int64)
    raise ConfigError(f"method.class_source={source!r}; use one of {'|'.join(CLASS_SOURCES)}")
