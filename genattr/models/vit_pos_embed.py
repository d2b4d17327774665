"""Position embeddings of a timm ViT interpolated at every forward, the way DINOv2's torch.hub models do.

AI-GenBench's DINOv2 detector is torch.hub ``facebookresearch/dinov2`` ``dinov2_vitl14``. That model
keeps the checkpoint's 37x37 grid as its parameter and, for each input, interpolates it to the input's
grid (``DinoVisionTransformer.interpolate_pos_encoding`` in dinov2/models/vision_transformer.py):
bicubic, without antialiasing, in float32, and, because of a historical offset of 0.1, with
``scale_factor=(16 + 0.1) / 37`` instead of an output size, so PyTorch samples the grid at the scale
16.1/37, not 16/37. The class token's embedding is kept apart and never interpolated. timm's
``vit_large_patch14_dinov2`` built at ``img_size=224`` instead resamples the grid once at load (bicubic,
antialiased, ``size=16``) and trains the 16x16 result; its ``dynamic_img_size`` resamples per forward,
but with that same antialiased ``size=`` call. Neither gives the original's features.

:class:`HubPosEmbedViT` is timm's ``VisionTransformer`` with that one step replaced: same modules, same
parameter names, so timm's weights (or the hub's own release file, which timm converts) load unchanged.
"""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from genattr.utils.errors import ConfigError


def hub_interpolate(
    pos_embed: torch.Tensor,
    grid: tuple[int, int],
    *,
    old_grid: tuple[int, int],
    num_prefix: int,
    offset: float,
    antialias: bool,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``pos_embed`` (1, prefix + old grid, C) for a ``grid`` of patches, as the DINOv2 hub code makes it.

    The same grid returns the parameter itself (the hub returns it without a dtype cast). Otherwise the
    first ``num_prefix`` rows (the class token) are kept as they are and the patch grid is interpolated
    in float32 (bicubic; ``scale_factor=(n + offset) / M`` when ``offset`` is non-zero, else
    ``size=n``), and the result is cast to ``dtype``, the dtype of the tokens it is added to.
    """
    h, w = grid
    old_h, old_w = old_grid
    if (h, w) == (old_h, old_w):
        return pos_embed
    dim = pos_embed.shape[-1]
    table = pos_embed.float()
    prefix, patches = table[:, :num_prefix], table[:, num_prefix:]
    patches = patches.reshape(1, old_h, old_w, dim).permute(0, 3, 1, 2)
    if offset:
        resize: dict = {"scale_factor": ((h + offset) / old_h, (w + offset) / old_w)}
    else:
        resize = {"size": (h, w)}
    patches = nn.functional.interpolate(patches, mode="bicubic", antialias=antialias, **resize)
    if tuple(patches.shape[-2:]) != (h, w):  # the hub asserts the same
        raise RuntimeError(f"interpolated position grid {tuple(patches.shape[-2:])} is not the input grid {grid}")
    patches = patches.permute(0, 2, 3, 1).reshape(1, h * w, dim)
    return torch.cat([prefix, patches], dim=1).to(dtype)


class HubPosEmbedViT(VisionTransformer):
    """timm's ViT whose position embeddings are interpolated per forward as DINOv2's hub model does.

    Made by :func:`use_hub_pos_embed` from a built ``VisionTransformer`` (``dynamic_img_size=True``,
    so the patch embedding hands over the grid); only ``_pos_embed`` differs.
    """

    hub_pos_offset: float
    hub_pos_antialias: bool

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        prefix = [t.expand(b, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if not self.no_embed_class and prefix:
            x = torch.cat([*prefix, x], dim=1)  # DINOv2: the class token has its own position embedding
        pos = hub_interpolate(
            self.pos_embed,
            (h, w),
            old_grid=tuple(self.patch_embed.grid_size),
            num_prefix=0 if self.no_embed_class else self.num_prefix_tokens,
            offset=self.hub_pos_offset,
            antialias=self.hub_pos_antialias,
            dtype=x.dtype,
        )
        x = x + pos
        if self.no_embed_class and prefix:  # timm's registers layout: no position embedding for them
            x = torch.cat([*prefix, x], dim=1)
        return self.pos_drop(x)


def use_hub_pos_embed(model: nn.Module, *, offset: float, antialias: bool, name: str) -> HubPosEmbedViT:
    """Turn a timm ``VisionTransformer`` built with ``dynamic_img_size=True`` into a :class:`HubPosEmbedViT`.

    The module keeps its parameters (the checkpoint's full grid stays the trained parameter); only the
    class changes, to the subclass that adds position embeddings the hub's way.
    """
    if type(model) is not VisionTransformer or getattr(model, "pos_embed", None) is None:
        raise ConfigError(
            f"model.pos_embed_resample=hub needs a timm VisionTransformer with absolute position embeddings, "
            f"but {name} is a {type(model).__name__}; set model.pos_embed_resample=null"
        )
    if not model.dynamic_img_size:
        raise ValueError("build the ViT with dynamic_img_size=True so its patch embedding keeps the grid")
    model.__class__ = HubPosEmbedViT
    model.hub_pos_offset = float(offset)
    model.hub_pos_antialias = bool(antialias)
    return model
