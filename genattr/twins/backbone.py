"""Pretrain a small backbone on the synthetic pretraining set, once, and cache it.

A frozen *random* ViT is not what LoRA adapters adapt on real CDDB. With
``model.twin_pretrain.enabled`` (on in the CDDB twin's CPU profile) a twin run starts from a
backbone pretrained on a separate synthetic set (by default content classification, as ImageNet
is; never a twin fingerprint or a twin domain: :mod:`genattr.twins.pretrain`), playing the role
of ImageNet pretraining. The file is written once (temp file + rename) under
``<cache_dir>/twin_backbones/``, named by the architecture and a hash of the architecture
and the recipe, and found there by every later run.
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
from safetensors.torch import save_file
from torch import nn

from genattr.models.backbones import feature_dim
from genattr.utils.weights import state_dict_cpu

log = logging.getLogger(__name__)

#: Bump when the training loop or the pretext set (genattr/twins/pretrain.py) changes: the cache key then changes.
RECIPE_VERSION = 3


def ensure_twin_backbone(
    model: nn.Module,
    *,
    name: str,
    extra: Mapping[str, Any],
    cache_dir: Path,
    steps: int,
    warmup_steps: int,
    batch_size: int,
    lr: float,
    n_images: int,
    strength: float,
    seed: int,
    pretext: str,
) -> Path:
    """Return the cached safetensors file for this recipe, training ``model`` if needed.

    The recipe (``model.twin_pretrain`` less ``enabled``) has its defaults in ``conf/model``: a linear warm-up
    of ``warmup_steps``, then cosine decay to 0. A ViT from scratch is touchy here: at lr 1e-3, or with the
    ``degradations`` pretext at ``strength`` 1, the tiny twin ConViT stays at chance within a CPU step budget.
    """
    from genattr.twins.pretrain import pretrain_set

    recipe = dict(
        name=name,
        extra=dict(extra),
        steps=steps,
        warmup_steps=warmup_steps,
        batch_size=batch_size,
        lr=lr,
        n_images=n_images,
        strength=strength,
        seed=seed,
        pretext=pretext,
        version=RECIPE_VERSION,
    )
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:12]
    out = cache_dir / "twin_backbones" / f"{name}-{key}.safetensors"
    if out.is_file():
        log.info("twin-pretrained backbone from cache: %s", out)
        return out
    crop = int(extra.get("img_size", 224))
    log.warning("pretraining %s on the synthetic pretraining set (%d steps, cached at %s)", name, steps, out)
    t0 = time.time()
    images, labels, n_classes = pretrain_set(
        n_images, image_size=crop + 8, seed=seed, pretext=pretext, strength=strength
    )
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # uint8 N,3,H,W
    y_all = torch.from_numpy(labels).long()
    gen = torch.Generator().manual_seed(seed)
    head = nn.Linear(feature_dim(model), n_classes)
    net = nn.Sequential(model, head)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    net.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps=steps, warmup_steps=warmup_steps, lr=lr)
        idx = torch.randint(0, len(x_all), (batch_size,), generator=gen)
        ox, oy = torch.randint(0, 9, (2,), generator=gen).tolist()
        x = x_all[idx, :, oy : oy + crop, ox : ox + crop].float().div_(255).sub_(0.5).div_(0.5)
        loss = nn.functional.cross_entropy(net(x), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log.info("twin pretrain step %d/%d loss %.3f", step + 1, steps, loss.item())
    acc = _accuracy(net, x_all[-512:], y_all[-512:], crop)
    log.info("twin pretraining done in %.0fs (train-set accuracy %.1f%%)", time.time() - t0, acc)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".tmp")
    os.close(fd)
    save_file(state_dict_cpu(model), tmp, metadata={"recipe": json.dumps(recipe, default=str)})
    os.replace(tmp, out)
    return out


def _lr_at(step: int, *, steps: int, warmup_steps: int, lr: float) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to 0 at ``steps``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, steps - warmup_steps)))


@torch.no_grad()
def _accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, crop: int) -> float:
    net.eval()
    off = (x.shape[-1] - crop) // 2
    xs = x[:, :, off : off + crop, off : off + crop].float().div(255).sub(0.5).div(0.5)
    pred = net(xs).argmax(1)
    net.train()
    return float(np.mean((pred == y).numpy()) * 100)


def twin_backbone_file(model_cfg: Mapping[str, Any], recipe: Mapping[str, Any], cache_dir: Path) -> Path:
    """The cached twin-pretrained weights of the timm backbone ``model_cfg`` describes (trained once if missing)."""
    from genattr.models.backbones import create_backbone

    arch = {"name": model_cfg["name"], "img_size": model_cfg.get("img_size"), "kwargs": model_cfg.get("kwargs")}
    extra = dict(arch["kwargs"] or {}) | {"num_classes": 0}
    if arch["img_size"] is not None:
        extra["img_size"] = arch["img_size"]
    recipe = {k: v for k, v in recipe.items() if k != "enabled"}
    # the file depends on the recipe only (its seed draws the initial weights and the dropout), never on the
    # state of the run that happened to build it first: the cache key is the recipe
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(recipe["seed"]))
        model = create_backbone(**arch, pretrained=False)
        return ensure_twin_backbone(model, name=str(arch["name"]), extra=extra, cache_dir=cache_dir, **recipe)
