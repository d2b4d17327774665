"""Real/fake detectors by name: ``<timm model name>_probe`` or ``<timm model name>_tune``.

``_probe`` trains a linear head on a frozen backbone: the backbone stays in eval mode
whatever ``train()`` is called with, runs under ``no_grad``, has ``requires_grad=False``
and is left out of the optimizer and of checkpoints (:meth:`Detector.trainable_state`).
``_tune`` trains everything, BatchNorm statistics included. Both end in one logit.

Names resolve through timm only: an unknown name is an error that says how to list the
valid ones, never a silent fall-through to another library (the original factory
swallowed exceptions and let timm shadow torchvision names).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import timm
import torch
from torch import nn

from genattr.models.backbones import create_backbone, feature_dim
from genattr.utils.errors import ConfigError

log = logging.getLogger(__name__)

MODES = ("probe", "tune")


def split_name(name: str) -> tuple[str, str]:
    """``"vit_base_patch16_224.augreg_in21k_probe"`` -> (timm name, mode)."""
    base, _, mode = name.rpartition("_")
    if mode not in MODES or not base:
        raise ConfigError(
            f"model.name={name!r} must end in _probe (frozen backbone, linear head) or _tune (train everything), "
            "e.g. vit_large_patch14_dinov2.lvd142m_probe"
        )
    arch = base.split(".")[0]
    if not timm.is_model(arch):
        hint = timm.list_models(f"*{arch.split('_')[0]}*")[:12]
        raise ConfigError(
            f"model.name={name!r}: {arch!r} is not a timm model (close names: {hint or 'none'}); list valid names "
            "with: python -c \"import timm; print(timm.list_models('*dinov2*', pretrained=True))\""
        )
    return base, mode


class Detector(nn.Module):
    """A timm backbone (pooled features) and a linear head with one logit."""

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
            nn.init.zeros_(self.head.bias)
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
) -> Detector:
    """Build ``name`` (``<timm name>_<probe|tune>``) with one output logit.

    ``input_size`` is the side the data pipeline feeds; ViTs also need it in ``kwargs``
    (``img_size``) to resample their position embeddings, which the model configs do.
    ``features=pooled`` feeds the pooled pre-logits (timm ``num_classes=0``);
    ``embedding`` keeps timm's own head, e.g. the projection to the CLIP embedding that the
    original CLIP detectors used, optionally L2-normalised (``normalize_features``).
    """
    if features not in ("pooled", "embedding"):
        raise ConfigError(f"model.features={features!r}; expected 'pooled' or 'embedding'")
    base, mode = split_name(name)
    backbone = create_backbone(
        name=base,
        pretrained=pretrained,
        weights=weights,
        kwargs=dict(kwargs or {}),
        num_classes=0 if features == "pooled" else None,
    )
    dim = feature_dim(backbone) if features == "pooled" else int(backbone.num_classes)
    det = Detector(backbone, mode, dim=dim, normalize=bool(normalize_features), head_init_std=head_init_std)
    n_train = sum(p.numel() for p in det.parameters() if p.requires_grad)
    log.info("detector %s: %s mode, input %d px, %d trainable parameters", base, mode, input_size, n_train)
    return det
