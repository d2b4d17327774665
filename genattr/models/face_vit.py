"""Face Transformer ViT-P8S8 with a CosFace head (the ImageNet100 ViT is in ``imagenet_vit``).

Both forgetting backbones share one interface, ``net(x, label=None) -> (logits, emb)``,
and keep timm ``Block``s in ``net.blocks`` (``mlp.fc1`` / ``mlp.fc2`` are the LoRA
targets), so GS-LoRA and every baseline run on either unchanged.

ViT-P8S8 (``specs/gslora.md`` 2.1): 112x112 pixels in [0, 1], patch 8 -> 196 tokens + CLS,
dim 512, depth 6, 8 heads, MLP 2048, dropout 0.1, qkv without bias, pre-norm, embedding =
LayerNorm(CLS); CosFace s = 64, m = 0.35, 19,157,504 parameters for 100 classes. The
original scales attention by ``dim ** -0.5`` (not ``head_dim``): ``attn_scale: dim``
reproduces it. Its LayerNorms are torch's (eps 1e-5, timm's default is 1e-6), so the blocks
get ``nn.LayerNorm``; its CLS token and position embedding start from ``torch.randn``
(``embed_init: randn``; timm ViTs use ``trunc_normal`` with std 0.02). ``model.weights``
also reads the original's own checkpoints (``face_checkpoint``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

from genattr.models.face_checkpoint import LORA_MODES, convert_face_checkpoint
from genattr.utils.errors import ConfigError

log = logging.getLogger(__name__)

ATTN_SCALES = ("dim", "head_dim")
EMBED_INITS = ("randn", "trunc_normal")


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
        embed_init: str = "randn",
    ) -> None:
        super().__init__()
        if attn_scale not in ATTN_SCALES:
            raise ConfigError(f"model.attn_scale={attn_scale} is unknown; choose one of {list(ATTN_SCALES)}")
        if embed_init not in EMBED_INITS:
            raise ConfigError(f"model.embed_init={embed_init} is unknown; choose one of {list(EMBED_INITS)}")
        self.embed_init = embed_init
        if img_size % patch_size:
            raise ConfigError(f"model.img_size={img_size} must be a multiple of model.patch_size={patch_size}")
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=3, embed_dim=embed_dim)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, embed_dim))
        self.reset_embeddings()
        self.pos_drop = nn.Dropout(emb_dropout)
        # dropout as in the original: after the attention projection, after GELU and after fc2
        # (timm's proj_drop); none on the attention map; exact GELU; torch LayerNorm (eps 1e-5)
        self.blocks = nn.Sequential(
            *[
                Block(
                    embed_dim,
                    num_heads,
                    mlp_ratio=mlp_dim / embed_dim,
                    qkv_bias=False,
                    proj_drop=dropout,
                    norm_layer=nn.LayerNorm,
                )
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

    def reset_embeddings(self) -> None:
        """Draw the CLS token and position embedding as ``model.embed_init`` says (random init)."""
        for p in (self.pos_embed, self.cls_token):
            if self.embed_init == "randn":  # the original's torch.randn: N(0, 1)
                nn.init.normal_(p)
            else:
                nn.init.trunc_normal_(p, std=0.02)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.blocks(self.pos_drop(x))
        return self.norm(x[:, 0])

    def forward(self, x: torch.Tensor, label: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        emb = self.features(x)
        return self.head(emb, label), emb


def _load_weights(net: FaceViT, weights: str, checkpoint: Mapping[str, Any]) -> None:
    """Load a FaceViT or an original ``vit_face`` state dict (``face_checkpoint``) into ``net``."""
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.weights={weights} does not exist (expected a .safetensors or .pth state dict)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # unpickling refused or a corrupt file: say which file
            raise ConfigError(
                f"model.weights={weights} is not a readable tensor state dict "
                f"(torch.load with weights_only=True refused it: {type(err).__name__})"
            ) from err
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.weights={weights} is not a state dict of tensors (got {type(state).__name__})")
    missing = [k for k in ("lora", "lora_alpha") if k not in checkpoint]
    if missing:
        raise ConfigError(f"model.checkpoint needs {missing} to read model.weights (see conf/model/vit_face_p8s8.yaml)")
    converted = convert_face_checkpoint(
        state,
        net.state_dict(),
        source=f"model.weights={weights}",
        lora=str(checkpoint["lora"]),
        lora_alpha=float(checkpoint["lora_alpha"]),
    )
    net.load_state_dict(converted, strict=True)
    log.info("loaded backbone weights from %s", path)


def build_face_vit(
    *,
    num_classes: int,
    class_ids: Sequence[int] | None = None,
    name: str = "vit_face_p8s8",
    weights: str | None = None,
    head: Mapping[str, float],
    checkpoint: Mapping[str, Any] | None = None,
    **arch: Any,
) -> FaceViT:
    """``conf/model/vit_face_*.yaml`` ``_target_``; ``class_ids`` is unused (the head is per dataset).

    ``checkpoint`` (``lora``, ``lora_alpha``) says how loralib keys in an original-layout
    ``weights`` file are read.
    """
    net = FaceViT(num_classes=num_classes, s=float(head["s"]), m=float(head["m"]), **arch)
    ck = dict(checkpoint or {})
    if "lora" in ck and ck["lora"] not in LORA_MODES:
        raise ConfigError(f"model.checkpoint.lora={ck['lora']} is unknown; choose one of {list(LORA_MODES)}")
    if weights is not None:
        _load_weights(net, weights, ck)
    return net
