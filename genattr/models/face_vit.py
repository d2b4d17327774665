"""Face Transformer ViT-P8S8 with a CosFace head, and the sliced-head timm ViT for ImageNet100.

Both forgetting backbones share one interface, ``net(x, label=None) -> (logits, emb)``,
and keep timm ``Block``s in ``net.blocks`` (``mlp.fc1`` / ``mlp.fc2`` are the LoRA
targets), so GS-LoRA and every baseline run on either unchanged.

ViT-P8S8 (``specs/gslora.md`` 2.1): 112x112 pixels in [0, 1], patch 8 -> 196 tokens + CLS,
dim 512, depth 6, 8 heads, MLP 2048, dropout 0.1, qkv without bias, pre-norm, embedding =
LayerNorm(CLS); CosFace s = 64, m = 0.35, 19,157,504 parameters for 100 classes. The
original scales attention by ``dim ** -0.5`` (not ``head_dim``): ``attn_scale: dim``
reproduces it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

from genattr.utils.errors import ConfigError

log = logging.getLogger(__name__)

ATTN_SCALES = ("dim", "head_dim")


class CosFace(nn.Module):
    """Large-margin cosine head: ``s * (cos(theta) - m * onehot(label))``, no bias.

    The margin is applied whenever a label is passed, which is how the original
    evaluates too (``eval_margin``); pass ``label=None`` for plain argmax logits.
    """

    def __init__(self, in_features: int, n_classes: int, s: float = 64.0, m: float = 0.35) -> None:
        super().__init__()
        self.s, self.m = float(s), float(m)
        self.weight = nn.Parameter(torch.empty(n_classes, in_features))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, emb: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        cos = F.linear(F.normalize(emb), F.normalize(self.weight))
        if label is not None:
            cos = cos - self.m * F.one_hot(label, cos.shape[1]).to(cos.dtype)
        return self.s * cos


class FaceViT(nn.Module):
    """ViT_face: timm patch embedding and blocks, LayerNorm(CLS) embedding, CosFace head."""

    def __init__(
        self,
        *,
        num_classes: int,
        img_size: int = 112,
        patch_size: int = 8,
        embed_dim: int = 512,
        depth: int = 6,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        dropout: float = 0.1,
        emb_dropout: float = 0.1,
        s: float = 64.0,
        m: float = 0.35,
        attn_scale: str = "dim",
    ) -> None:
        super().__init__()
        if attn_scale not in ATTN_SCALES:
            raise ConfigError(f"model.attn_scale={attn_scale} is unknown; choose one of {list(ATTN_SCALES)}")
        if img_size % patch_size:
            raise ConfigError(f"model.img_size={img_size} must be a multiple of model.patch_size={patch_size}")
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=3, embed_dim=embed_dim)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, embed_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.pos_drop = nn.Dropout(emb_dropout)
        self.blocks = nn.Sequential(
            *[
                Block(embed_dim, num_heads, mlp_ratio=mlp_dim / embed_dim, qkv_bias=False, proj_drop=dropout)
                for _ in range(depth)
            ]
        )
        if attn_scale == "dim":  # the original's dim ** -0.5; timm's fused kernel cannot take it
            for blk in self.blocks:
                blk.attn.scale = embed_dim**-0.5
                blk.attn.fused_attn = False
        self.norm = nn.LayerNorm(embed_dim)
        self.head = CosFace(embed_dim, num_classes, s=s, m=m)
        self.num_features = embed_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.blocks(self.pos_drop(x))
        return self.norm(x[:, 0])

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.features(x)
        return self.head(emb, label), emb


class SlicedHeadViT(nn.Module):
    """A timm ViT whose 1000-way ImageNet head is cut to the given class ids (plain Linear)."""

    def __init__(self, vit: nn.Module, class_ids: Sequence[int]) -> None:
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

    @property
    def blocks(self) -> nn.Sequential:
        """The timm blocks (a property, not a second registration, so the state dict has one copy)."""
        return self.vit.blocks

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_head(self.vit.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.features(x)
        return self.head(emb), emb


def _load_weights(net: nn.Module, weights: str) -> None:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.weights={weights} does not exist (expected a .safetensors or .pth state dict)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"model.weights={weights} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    log.info("loaded backbone weights from %s", path)


def build_face_vit(
    *,
    num_classes: int,
    class_ids: Sequence[int] | None = None,
    name: str = "vit_face_p8s8",
    weights: str | None = None,
    head: Mapping[str, float] | None = None,
    **arch: Any,
) -> FaceViT:
    """``conf/model/vit_face_*.yaml`` ``_target_``; ``class_ids`` is unused (the head is per dataset)."""
    head = dict(head or {})
    net = FaceViT(num_classes=num_classes, s=float(head.get("s", 64.0)), m=float(head.get("m", 0.35)), **arch)
    if weights is not None:
        _load_weights(net, weights)
    return net


def build_imagenet_vit(
    *,
    num_classes: int,
    class_ids: Sequence[int] | None,
    name: str = "vit_base_patch16_224",
    pretrained: bool = False,
    weights: str | None = None,
    img_size: int | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> SlicedHeadViT:
    """``conf/model/vit_b16_imagenet100.yaml``: timm ViT with the ImageNet head sliced by ``class_ids``.

    ``weights`` is a local timm-format file of the full 1000-way model; the twin uses a
    tiny ViT (``kwargs``) trained on the twin instead (``twin_pretrain`` in the loop).
    """
    if class_ids is None or len(class_ids) != num_classes:
        raise ConfigError("the ImageNet backbone needs the folder-name mapping (protocol.info['imagenet_ids'])")
    extra = dict(kwargs or {})
    if img_size is not None:
        extra["img_size"] = img_size
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ConfigError(f"model.weights={weights} does not exist (expected the timm {name} weights)")
        vit = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **extra)
    elif pretrained:
        from genattr.models.backbones import _check_hub_reachable

        _check_hub_reachable(name)
        vit = timm.create_model(name, pretrained=True, **extra)
    else:
        vit = timm.create_model(name, pretrained=False, **extra)
    return SlicedHeadViT(vit, class_ids)
