"""Backbones by timm name: hub weights, a local weight file, or the twin-pretrained cache.

A backbone returns pooled features (``num_classes=0``): for ConViT the CLS token after
the final LayerNorm, which is what LoRAX concatenates across adapters.
The hub-cache probes here also serve the open_clip image towers (``open_clip_towers``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import timm
from torch import nn

from genattr.utils.errors import ConfigError

log = logging.getLogger(__name__)


def create_backbone(
    *,
    name: str,
    pretrained: bool = False,
    weights: str | None = None,
    img_size: int | None = None,
    kwargs: Mapping[str, Any] | None = None,
    twin_pretrain: Mapping[str, Any] | None = None,
    cache_dir: str | None = None,
    num_classes: int | None = 0,
) -> nn.Module:
    """Build ``name`` from timm without a classifier.

    ``weights`` (a local ``.safetensors``/``.pth`` file) wins over ``pretrained``; it is
    what offline cluster nodes use. With ``twin_pretrain.enabled`` and neither of the
    two, the backbone is pretrained once on the synthetic pretraining set and cached.
    ``num_classes=None`` keeps timm's own head (e.g. the projection to a CLIP embedding).
    """
    extra = dict(kwargs or {})
    if num_classes is not None:
        extra["num_classes"] = num_classes
    if img_size is not None:
        extra["img_size"] = img_size
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:20]
        raise ConfigError(
            f"model.name={name} is not a timm model; similar names: {close or 'none'} "
            "(python -c \"import timm; print(timm.list_models('convit*'))\" lists them)."
        )
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ConfigError(f"model.weights={weights} does not exist (expected a .safetensors or .pth file).")
        log.info("loading %s weights from %s", name, path)
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **extra)
    if pretrained:
        _check_hub_reachable(name)
        return timm.create_model(name, pretrained=True, **extra)
    model = timm.create_model(name, pretrained=False, **extra)
    if twin_pretrain and twin_pretrain.get("enabled"):
        from genattr.twins.backbone import ensure_twin_backbone

        if cache_dir is None:
            raise ConfigError("model.cache_dir must be set to cache the twin-pretrained backbone.")
        file = ensure_twin_backbone(model, name=name, extra=extra, cache_dir=Path(cache_dir), **twin_pretrain)
        from safetensors.torch import load_file

        missing, unexpected = model.load_state_dict(load_file(file), strict=False)
        if missing or unexpected:
            raise RuntimeError(f"twin backbone {file} does not match {name}: {missing} {unexpected}")
    return model


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids downloads (then only cached hub files can be used)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def hub_file_cached(repo_id: str, filenames: Iterable[str]) -> bool:
    """Whether one of ``filenames`` of the hub repo ``repo_id`` is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in filenames)


def _check_hub_reachable(name: str) -> None:
    """Offline + pretrained without a cached file is an immediate error, not a 50 s hang."""
    if not hub_offline():
        return
    cfg = timm.models.get_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if hub_id and hub_file_cached(hub_id, ("model.safetensors", "pytorch_model.bin")):
        return
    raise ConfigError(
        f"model.pretrained=true needs the {name} weights from the Hugging Face hub, but "
        "HF_HUB_OFFLINE=1 and they are not cached; set model.weights=/path/to/weights.safetensors "
        "or model.pretrained=false."
    )


def feature_dim(model: nn.Module) -> int:
    """Width of the pooled feature a backbone returns."""
    dim = getattr(model, "num_features", None)
    if dim is None:
        raise TypeError(f"{type(model).__name__} has no num_features")
    return int(dim)
