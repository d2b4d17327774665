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
    num_classes: int | None = 0,
) -> nn.Module:
    """Build ``name`` from timm without a classifier.

    ``weights`` (a local ``.safetensors``/``.pth`` file) wins over ``pretrained``; it is
    what offline cluster nodes use (the CDDB twin hands its twin-pretrained backbone over the same way).
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
        keys = _weight_keys(path, weights)
        try:
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **extra)
        except RuntimeError as err:  # load_state_dict's size mismatches, or a stem timm cannot adapt
            lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()] or [type(err).__name__]
            why = next((ln for ln in lines if ln.startswith("size mismatch")), lines[0]).rstrip(".")
            raise ConfigError(f"model.weights={weights} does not fit {name} ({why}); use a {name} checkpoint") from err
        _check_weight_keys(model, keys, name, weights)
        return model
    if pretrained:
        _check_hub_reachable(name)
        return timm.create_model(name, pretrained=True, **extra)
    return timm.create_model(name, pretrained=False, **extra)


def _weight_keys(path: Path, weights: str) -> set[str]:
    """Tensor names in a weight file (safetensors header, or a ``weights_only`` torch load), as timm reads them."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                return set(fh.keys())
        import torch

        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any parse failure means the file is not a weight file
        raise ConfigError(
            f"model.weights={weights} is not a readable .safetensors / .pth state dict ({type(err).__name__}: {err})"
        ) from err
    for wrapper in ("state_dict", "model", "state_dict_ema"):  # the wrappers timm unpacks
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict):
        raise ConfigError(f"model.weights={weights} does not hold a state dict (found {type(obj).__name__})")
    return {k[len("module.") :] if k.startswith("module.") else k for k in obj}


def _check_weight_keys(model: nn.Module, keys: set[str], name: str, weights: str) -> None:
    """Refuse another model's file: with ``num_classes`` changed timm loads non-strictly and would keep random weights.

    At least half of the model's tensors must be named in the file (timm's converters rename a few, never most).
    """
    own = set(model.state_dict())
    shared = own & keys
    if len(shared) * 2 >= len(own):
        return
    missing, extra = sorted(own - keys), sorted(keys - own)
    raise ConfigError(
        f"model.weights={weights} does not hold {name} weights: only {len(shared)} of the model's {len(own)} tensors "
        f"are in it (missing e.g. {missing[:3]}; the file has e.g. {extra[:3]}); point it at a {name} checkpoint"
    )


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
