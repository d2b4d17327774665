"""The ImageNet100 backbone of GS-LoRA: ViT-B/16 with its 1000-way head sliced to 100 classes.

The original (``bjzhb666/GS-LoRA``, ``train/train_own_forget_cl.py`` with ``-n VIT_B16``)
uses torchvision ``vit_b_16(weights=IMAGENET1K_V1)`` through ``ModifiedViT`` (embedding =
the LayerNorm'd CLS token, head = ``heads.head``) and puts loralib LoRA on ``mlp.0`` and
``mlp.3`` of every encoder block (``util/utils.py:replace_ffn_with_lora``). The forgetting
family needs timm ``Block``s in ``net.blocks`` (``mlp.fc1`` / ``mlp.fc2`` are the LoRA
targets, the same two linears), so a torchvision state dict is renamed key by key into
timm's ``vit_base_patch16_224`` layout. The two forwards are the same function: LayerNorm
eps 1e-6 and exact GELU on both sides, ``in_proj`` stacks q, k, v as timm's ``qkv`` does.

Normalisation belongs to the weights, so it lives here and not in the data transform: the
network takes pixels in [0, 1] and applies the mean/std the weights were trained with
(torchvision's ``IMAGENET1K_V1`` preset, or the timm ``pretrained_cfg`` of a timm file).
The data option only resizes and crops; :func:`check_preprocess` warns when those differ
from the weights' own preset.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from genattr.utils.errors import ConfigError

log = logging.getLogger(__name__)

WEIGHT_FORMATS = ("auto", "torchvision", "timm")
#: the torchvision release file of the paper's backbone (``ViT_B_16_Weights.IMAGENET1K_V1``)
TORCHVISION_FILE = "vit_b_16-c867db91.pth"

_BLOCK = r"encoder\.layers\.encoder_layer_(\d+)\."
#: torchvision ViT key -> timm ViT key; ``mlp.linear_{1,2}`` is the pre-0.14 torchvision name of ``mlp.{0,3}``
_TV_TO_TIMM: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p), r)
    for p, r in (
        (r"^class_token$", "cls_token"),
        (r"^conv_proj\.(weight|bias)$", r"patch_embed.proj.\1"),
        (r"^encoder\.pos_embedding$", "pos_embed"),
        (r"^encoder\.ln\.(weight|bias)$", r"norm.\1"),
        (r"^heads\.head\.(weight|bias)$", r"head.\1"),
        (_BLOCK + r"ln_1\.(weight|bias)$", r"blocks.\1.norm1.\2"),
        (_BLOCK + r"ln_2\.(weight|bias)$", r"blocks.\1.norm2.\2"),
        (_BLOCK + r"self_attention\.in_proj_(weight|bias)$", r"blocks.\1.attn.qkv.\2"),
        (_BLOCK + r"self_attention\.out_proj\.(weight|bias)$", r"blocks.\1.attn.proj.\2"),
        (_BLOCK + r"mlp\.(?:0|linear_1)\.(weight|bias)$", r"blocks.\1.mlp.fc1.\2"),
        (_BLOCK + r"mlp\.(?:3|linear_2)\.(weight|bias)$", r"blocks.\1.mlp.fc2.\2"),
    )
)


def torchvision_to_timm(state: Mapping[str, torch.Tensor], source: str = "state dict") -> dict[str, torch.Tensor]:
    """Rename a torchvision ``VisionTransformer`` state dict into timm's ViT layout (same tensors)."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        for pattern, repl in _TV_TO_TIMM:
            new, n = pattern.subn(repl, key)
            if n:
                out[new] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ConfigError(
            f"{source} has keys that are not part of torchvision's vit_b_16 ({unknown[:5]}); "
            "expected the plain IMAGENET1K_V1 state dict (conv_proj, class_token, encoder.*, heads.head)"
        )
    return out


def detect_format(state: Mapping[str, torch.Tensor]) -> str | None:
    """``torchvision`` (``encoder.layers.*``), ``timm`` (``blocks.*``) or None (neither)."""
    keys = list(state)
    if any(k.startswith(("encoder.layers.", "conv_proj.")) for k in keys):
        return "torchvision"
    if any(k.startswith(("blocks.", "patch_embed.")) for k in keys):
        return "timm"
    return None


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # unpickling refused or a corrupt file: say which file
            raise ConfigError(f"model.weights={path} is not a readable tensor state dict ({err})") from err
    for wrapper in ("state_dict", "model"):  # training checkpoints that wrap the weights
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ConfigError(f"model.weights={path} does not hold a state dict")
    return dict(state)


def _torchvision_release() -> dict[str, torch.Tensor]:
    """The paper's ``IMAGENET1K_V1`` file from the torch hub cache (torchvision downloads it when online)."""
    from torchvision.models import ViT_B_16_Weights

    cached = Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_FILE
    if not cached.is_file() and os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise ConfigError(
            f"model.pretrained=true needs torchvision's {TORCHVISION_FILE}, which is not in {cached.parent} "
            "and the run is offline; set model.weights=/path/to/vit_b_16-c867db91.pth"
        )
    try:
        return dict(ViT_B_16_Weights.IMAGENET1K_V1.get_state_dict(progress=False))
    except OSError as err:  # URLError is an OSError
        raise ConfigError(
            f"could not get torchvision's {TORCHVISION_FILE} ({err}); set model.weights=/path/to/{TORCHVISION_FILE}"
        ) from err


def torchvision_preprocess() -> dict[str, Any]:
    """Mean/std and eval resize/crop of ``IMAGENET1K_V1``, read from torchvision itself."""
    from torchvision.models import ViT_B_16_Weights

    t = ViT_B_16_Weights.IMAGENET1K_V1.transforms()
    return {
        "mean": tuple(float(v) for v in t.mean),
        "std": tuple(float(v) for v in t.std),
        "resize": int(t.resize_size[0]),
        "crop": int(t.crop_size[0]),
        "interpolation": str(t.interpolation.value),
    }


def timm_preprocess(vit: nn.Module) -> dict[str, Any]:
    """Mean/std and eval resize/crop of a timm model's default pretrained tag."""
    cfg = dict(getattr(vit, "pretrained_cfg", None) or {})
    crop = int(cfg.get("input_size", (3, 224, 224))[-1])
    return {
        "mean": tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406))),
        "std": tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225))),
        "resize": int(crop / float(cfg.get("crop_pct", 0.875))),
        "crop": crop,
        "interpolation": str(cfg.get("interpolation", "bicubic")),
    }


class SlicedHeadViT(nn.Module):
    """A timm ViT whose 1000-way ImageNet head is cut to the given class ids (plain Linear).

    Inputs are pixels in [0, 1]; ``mean``/``std`` (the weights' own) are applied first, as
    non-persistent buffers so that state dicts stay in timm's layout.
    """

    def __init__(
        self,
        vit: nn.Module,
        class_ids: Sequence[int],
        *,
        mean: Sequence[float] = (0.0, 0.0, 0.0),
        std: Sequence[float] = (1.0, 1.0, 1.0),
        preprocess: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        head = vit.get_classifier()
        if not isinstance(head, nn.Linear):
            raise ConfigError("the ImageNet backbone needs a Linear classifier to slice (num_classes=1000)")
        ids_list = [int(i) for i in class_ids]
        if max(ids_list) >= head.out_features:
            raise ConfigError(f"class id {max(ids_list)} is outside the {head.out_features}-way head")
        ids = torch.as_tensor(ids_list, dtype=torch.long, device=head.weight.device)
        self.head = nn.Linear(head.in_features, len(ids), device=head.weight.device)
        with torch.no_grad():
            self.head.weight.copy_(head.weight[ids])
            self.head.bias.copy_(head.bias[ids])
        vit.reset_classifier(0)
        self.vit = vit
        self.num_features = int(vit.num_features)
        dev = head.weight.device
        self.register_buffer("pixel_mean", torch.tensor([float(v) for v in mean], device=dev).view(1, -1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor([float(v) for v in std], device=dev).view(1, -1, 1, 1), False)
        #: the weights' own eval preprocessing (for :func:`check_preprocess`)
        self.preprocess = dict(preprocess or {})

    @property
    def blocks(self) -> nn.Sequential:
        """The timm blocks (a property, not a second registration, so the state dict has one copy)."""
        return self.vit.blocks

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.pixel_mean) / self.pixel_std
        return self.vit.forward_head(self.vit.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.features(x)
        return self.head(emb), emb


def check_preprocess(net: nn.Module, info: Mapping[str, Any]) -> None:
    """Warn when the data's resize/crop differ from the weights' own eval preset (real data only)."""
    pre = getattr(net, "preprocess", None)
    if not pre or "resize" not in info:
        return
    data = {"resize": int(info["resize"]), "crop": int(info["crop"])}
    if data != {"resize": pre.get("resize"), "crop": pre.get("crop")}:
        log.warning(
            "data.resize/crop = %s differ from the weights' own eval preset %s (the GS-LoRA original uses "
            "Resize 256 / CenterCrop 224 bilinear, torchvision's IMAGENET1K_V1 preset)",
            data,
            {k: pre.get(k) for k in ("resize", "crop", "interpolation")},
        )


def _load_into(vit: nn.Module, state: dict[str, torch.Tensor], fmt: str, source: str) -> None:
    if fmt == "torchvision":
        state = torchvision_to_timm(state, source)
    else:
        from timm.models.vision_transformer import checkpoint_filter_fn

        state = checkpoint_filter_fn(state, vit)
    missing, unexpected = vit.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"{source} ({fmt} format) does not fit timm {type(vit).__name__}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def build_imagenet_vit(
    *,
    num_classes: int,
    class_ids: Sequence[int] | None,
    name: str = "vit_base_patch16_224",
    pretrained: bool = False,
    weights: str | None = None,
    weights_format: str = "auto",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    img_size: int | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> SlicedHeadViT:
    """``conf/model/vit_b16_imagenet100.yaml``: ViT-B/16 with the ImageNet head sliced by ``class_ids``.

    ``weights`` is a local file of the full 1000-way model, in torchvision's layout (the
    paper's ``vit_b_16-c867db91.pth``) or timm's; ``weights_format: auto`` tells them apart
    by their keys. ``pretrained`` without ``weights`` takes the paper's torchvision release
    (``weights_format: timm`` takes timm's hub weights of ``name`` instead). ``mean``/``std``
    null = the weights' own normalisation; random init (the twin) uses the paper's.
    """
    if class_ids is None or len(class_ids) != num_classes:
        raise ConfigError("the ImageNet backbone needs the folder-name mapping (protocol.info['imagenet_ids'])")
    if weights_format not in WEIGHT_FORMATS:
        raise ConfigError(f"model.weights_format={weights_format} is unknown; choose one of {list(WEIGHT_FORMATS)}")
    extra = dict(kwargs or {})
    if img_size is not None:
        extra["img_size"] = img_size
    fmt: str | None = None
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"model.weights={weights} does not exist "
                f"(expected torchvision's {TORCHVISION_FILE} or a timm {name} file)"
            )
        state = _read_state(path)
        found = detect_format(state)
        if found is None:
            raise ConfigError(f"model.weights={weights} is neither a torchvision nor a timm ViT state dict")
        if weights_format != "auto" and weights_format != found:
            raise ConfigError(f"model.weights_format={weights_format} but model.weights={weights} is in {found} format")
        fmt = found
        vit = timm.create_model(name, pretrained=False, **extra)
        _load_into(vit, state, fmt, f"model.weights={weights}")
    elif pretrained and weights_format == "timm":
        from genattr.models.backbones import _check_hub_reachable

        _check_hub_reachable(name)
        vit = timm.create_model(name, pretrained=True, **extra)
        fmt = "timm"
    elif pretrained:
        vit = timm.create_model(name, pretrained=False, **extra)
        fmt = "torchvision"
        _load_into(vit, _torchvision_release(), fmt, f"torchvision {TORCHVISION_FILE}")
    else:
        vit = timm.create_model(name, pretrained=False, **extra)
    own = timm_preprocess(vit) if fmt == "timm" else torchvision_preprocess()
    norm = {"mean": tuple(own["mean"]), "std": tuple(own["std"])}
    for key, value in (("mean", mean), ("std", std)):
        if value is not None:
            value = tuple(float(v) for v in value)
            if value != norm[key]:
                log.warning("model.%s=%s overrides the weights' own %s %s", key, value, key, norm[key])
            norm[key] = value
    log.info(
        "ImageNet ViT %s: weights %s (%s format), normalisation mean %s std %s in the model",
        name,
        weights or ("torchvision IMAGENET1K_V1" if fmt == "torchvision" else "timm hub" if fmt else "random init"),
        fmt or "none",
        norm["mean"],
        norm["std"],
    )
    return SlicedHeadViT(vit, class_ids, mean=norm["mean"], std=norm["std"], preprocess=own if fmt else None)
