"""Real/fake detectors by name: ``<backbone>_probe`` or ``<backbone>_tune``.

``<backbone>`` is a timm model name, or ``open_clip:<model>.<tag>`` for an open_clip image
tower (:mod:`genattr.models.open_clip_towers`; AI-GenBench's ViT-L/14 CLIP is one).

``_probe`` trains a linear head on a frozen backbone: the backbone stays in eval mode
whatever ``train()`` is called with, runs under ``no_grad``, has ``requires_grad=False``
and is left out of the optimizer and of checkpoints (:meth:`Detector.trainable_state`).
``_tune`` trains everything, BatchNorm statistics included. Both end in one logit.

Names resolve through the one library they name: an unknown name is an error that says how to
list the valid ones, never a silent fall-through to another library (the original factory
swallowed exceptions and let timm shadow torchvision names).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import timm
import torch
from torch import nn

from genattr.models import open_clip_towers
from genattr.models.backbones import create_backbone, feature_dim
from genattr.models.vit_pos_embed import use_hub_pos_embed
from genattr.utils.errors import ConfigError

log = logging.getLogger(__name__)

MODES = ("probe", "tune")
#: how a timm ViT's position embeddings meet ``input_size`` (``model.pos_embed_resample``; None: as built)
POS_EMBED_RESAMPLE = ("hub", "timm")


def split_name(name: str) -> tuple[str, str]:
    """``"vit_base_patch16_224.augreg_in21k_probe"`` -> (backbone name, mode); the backbone is checked."""
    base, _, mode = name.rpartition("_")
    if mode not in MODES or not base:
        raise ConfigError(
            f"model.name={name!r} must end in _probe (frozen backbone, linear head) or _tune (train everything), "
            "e.g. vit_large_patch14_dinov2.lvd142m_probe"
        )
    if open_clip_towers.is_open_clip_name(base):
        open_clip_towers.parse_name(base)
        return base, mode
    arch = base.split(".")[0]
    if not timm.is_model(arch):
        hint = timm.list_models(f"*{arch.split('_')[0]}*")[:12]
        raise ConfigError(
            f"model.name={name!r}: {arch!r} is not a timm model (close names: {hint or 'none'}); list valid names "
            "with: python -c \"import timm; print(timm.list_models('*dinov2*', pretrained=True))\""
        )
    return base, mode


class Detector(nn.Module):
    """A backbone (pooled features or an embedding) and a linear head with one logit.

    ``head_init_std`` draws the head's weight from N(0, std) and leaves its bias at
    ``nn.Linear``'s default init, as AI-GenBench's open_clip detectors do (their ``ChannelLinear``
    is an ``nn.Linear`` whose weight alone is re-drawn); ``None`` keeps ``nn.Linear``'s init.
    """

    def __init__(
        self,
        backbone: nn.Module,
        mode: str,
        *,
        dim: int,
        normalize: bool = False,
        head_init_std: float | None = None,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(mode)
        self.mode = mode
        self.normalize = normalize
        self.backbone = backbone
        self.head = nn.Linear(dim, 1)
        if head_init_std is not None:
            nn.init.normal_(self.head.weight, std=head_init_std)
        if mode == "probe":
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> Detector:
        super().train(mode)
        if self.mode == "probe":
            self.backbone.eval()  # frozen statistics: BatchNorm / dropout never switch to training
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "probe":
            with torch.no_grad():
                feats = self.backbone(x)
        else:
            feats = self.backbone(x)
        if self.normalize:
            feats = nn.functional.normalize(feats, dim=-1)
        return self.head(feats).squeeze(-1)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: the head only (probe) or everything (tune)."""
        module: nn.Module = self.head if self.mode == "probe" else self
        prefix = "head." if self.mode == "probe" else ""
        return {prefix + k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}

    def load_trainable_state(self, state: Mapping[str, torch.Tensor]) -> None:
        own = self.state_dict()
        wrong = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
        if wrong:
            k = wrong[0]
            raise RuntimeError(
                f"checkpoint does not match the {self.mode} detector: {k} has shape {tuple(state[k].shape)}, "
                f"expected {tuple(own[k].shape)}"
                + (" (written with another model.pos_embed_resample?)" if k.endswith("pos_embed") else "")
            )
        missing, unexpected = self.load_state_dict(dict(state), strict=False)
        expected = set(self.trainable_state())
        lost = sorted(expected & set(missing))
        if lost or unexpected:
            raise RuntimeError(
                f"checkpoint does not match the {self.mode} detector: missing {lost}, unexpected {unexpected}"
            )


def build_detector(
    *,
    name: str,
    pretrained: bool = True,
    weights: str | None = None,
    input_size: int = 224,
    kwargs: Mapping[str, Any] | None = None,
    features: str = "pooled",
    normalize_features: bool = False,
    head_init_std: float | None = None,
    pos_embed_resample: str | None = None,
    hub_pos_offset: float = 0.1,
    hub_pos_antialias: bool = False,
) -> Detector:
    """Build ``name`` (``<backbone>_<probe|tune>``) with one output logit.

    ``input_size`` is the side the data pipeline feeds; open_clip towers take it directly, timm
    ViTs through ``pos_embed_resample`` (or ``kwargs.img_size``). ``features=pooled`` feeds the pooled pre-logits (timm
    ``num_classes=0``; open_clip without its projection); ``embedding`` keeps the model's own
    head, e.g. the projection to the CLIP embedding that the original CLIP detectors used,
    optionally L2-normalised (``normalize_features``). ``kwargs`` go to ``timm.create_model``
    or ``open_clip.create_model``.

    ``pos_embed_resample`` sets how a timm ViT's position embeddings meet ``input_size``: ``timm``
    builds it at ``img_size=input_size`` (timm resamples the checkpoint's grid once at load,
    antialiased); ``hub`` keeps the checkpoint's grid as the parameter and interpolates it at every
    forward as DINOv2's torch.hub models do (``hub_pos_offset``, ``hub_pos_antialias``:
    :mod:`genattr.models.vit_pos_embed`); ``None`` builds the model as ``kwargs`` say.
    """
    if features not in ("pooled", "embedding"):
        raise ConfigError(f"model.features={features!r}; expected 'pooled' or 'embedding'")
    if pos_embed_resample is not None and pos_embed_resample not in POS_EMBED_RESAMPLE:
        raise ConfigError(f"model.pos_embed_resample={pos_embed_resample!r}; expected hub, timm or null")
    base, mode = split_name(name)
    if pos_embed_resample is not None and open_clip_towers.is_open_clip_name(base):
        raise ConfigError(
            f"model.pos_embed_resample={pos_embed_resample} is for timm ViTs; open_clip towers take "
            "model.input_size, so set model.pos_embed_resample=null"
        )
    if open_clip_towers.is_open_clip_name(base):
        backbone = open_clip_towers.create_tower(
            name=base,
            pretrained=pretrained,
            weights=weights,
            input_size=input_size,
            embedding=features == "embedding",
            kwargs=kwargs,
        )
        dim = feature_dim(backbone)
    else:
        try:
            backbone = create_backbone(
                name=base,
                pretrained=pretrained,
                weights=weights,
                kwargs=_resample_kwargs(pos_embed_resample, dict(kwargs or {}), input_size),
                num_classes=0 if features == "pooled" else None,
            )
        except TypeError as e:
            if pos_embed_resample is None:
                raise
            raise ConfigError(
                f"model.pos_embed_resample={pos_embed_resample} needs a timm ViT with absolute position "
                f"embeddings, but {base} refuses its arguments ({e}); set model.pos_embed_resample=null"
            ) from e
        if pos_embed_resample == "hub":
            backbone = use_hub_pos_embed(backbone, offset=hub_pos_offset, antialias=hub_pos_antialias, name=base)
            _check_patch_multiple(backbone, input_size)
            log.info(
                "%s: position embeddings kept at %s and interpolated at every forward as the DINOv2 hub does "
                "(model.pos_embed_resample=hub, offset %s, antialias %s)",
                base,
                tuple(backbone.patch_embed.grid_size),
                hub_pos_offset,
                hub_pos_antialias,
            )
        elif pos_embed_resample == "timm":
            log.info(
                "%s: position embeddings resampled once at load to %d px (model.pos_embed_resample=timm)",
                base,
                input_size,
            )
        dim = feature_dim(backbone) if features == "pooled" else int(backbone.num_classes)
    det = Detector(backbone, mode, dim=dim, normalize=bool(normalize_features), head_init_std=head_init_std)
    n_train = sum(p.numel() for p in det.parameters() if p.requires_grad)
    log.info("detector %s: %s mode, input %d px, %d trainable parameters", base, mode, input_size, n_train)
    return det


def _resample_kwargs(resample: str | None, kwargs: dict[str, Any], input_size: int) -> dict[str, Any]:
    """``timm.create_model`` arguments for ``model.pos_embed_resample``.

    ``hub`` leaves ``img_size`` alone (the checkpoint's grid, or ``kwargs.img_size``, is the parameter)
    and asks for ``dynamic_img_size`` so the patch embedding hands the input's grid to the
    interpolation; ``timm`` builds the model at ``input_size``.
    """
    if resample == "hub":
        return {**kwargs, "dynamic_img_size": True}
    if resample == "timm":
        if kwargs.get("img_size", input_size) != input_size:
            raise ConfigError(
                f"model.kwargs.img_size={kwargs['img_size']} contradicts model.pos_embed_resample=timm, which "
                f"builds the ViT at model.input_size={input_size}"
            )
        return {**kwargs, "img_size": input_size}
    return kwargs


def _check_patch_multiple(vit: nn.Module, input_size: int) -> None:
    """The hub's patch embedding refuses a side that is not a multiple of the patch; say so before training."""
    patch = int(vit.patch_embed.patch_size[0])
    if input_size % patch:
        raise ConfigError(f"model.input_size={input_size} is not a multiple of the ViT's patch size {patch}")
