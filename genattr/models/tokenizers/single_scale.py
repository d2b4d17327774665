"""Single-scale VQ autoencoder in the MaskGIT-VQGAN layout that RAR's ``PretrainedTokenizer`` uses.

The module tree and parameter names (``encoder.down.{i}.block.{j}.conv1``, ``decoder.up.{i}.upsample_conv``,
``quantize.embedding``...) follow ``bytedance/1d-tokenizer`` so that ``maskgit-vqgan-imagenet-f16-256.bin``
loads with ``strict=True``; the released size is ``SingleScaleVQ()`` with its defaults and the twin's
``tinyrar`` is the same class with fewer channels and levels. Images are in [0, 1] on both sides (RAR's
``value_range "01"``); there is no ``quant_conv``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


def _conv(cin: int, cout: int, k: int, *, bias: bool = True) -> nn.Conv2d:
    # "same" padding; for odd kernels at stride 1 this equals upstream's Conv2dSame
    return nn.Conv2d(cin, cout, k, padding=k // 2, bias=bias)


class ResBlock(nn.Module):
    """MaskGIT residual block: bias-free convolutions, and the 1×1 shortcut applied to the *output*.

    The shortcut quirk (``nin_shortcut`` maps the block output, not its input, and is square out→out) is
    what the released weights were trained with, so it is reproduced rather than "fixed".
    """

    def __init__(self, cin: int, cout: int, *, groups: int, dropout: float) -> None:
        super().__init__()
        self.cin, self.cout = cin, cout
        self.norm1 = _norm(cin, groups)
        self.conv1 = _conv(cin, cout, 3, bias=False)
        self.norm2 = _norm(cout, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv(cout, cout, 3, bias=False)
        if cin != cout:
            self.nin_shortcut = _conv(cout, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        residual = self.nin_shortcut(h) if self.cin != self.cout else x
        return h + residual


class _DownLevel(nn.Module):
    def __init__(self, cin: int, cout: int, n_blocks: int, *, downsample: bool, groups: int, dropout: float) -> None:
        super().__init__()
        self.block = nn.ModuleList(
            ResBlock(cin if i == 0 else cout, cout, groups=groups, dropout=dropout) for i in range(n_blocks)
        )
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            x = blk(x)
        return F.avg_pool2d(x, 2, 2) if self.downsample else x


class _UpLevel(nn.Module):
    def __init__(self, cin: int, cout: int, n_blocks: int, *, upsample: bool, groups: int, dropout: float) -> None:
        super().__init__()
        self.block = nn.ModuleList(
            ResBlock(cin if i == 0 else cout, cout, groups=groups, dropout=dropout) for i in range(n_blocks)
        )
        self.add_upsample = upsample
        if upsample:
            self.upsample_conv = _conv(cout, cout, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.block:
            x = blk(x)
        if self.add_upsample:
            x = self.upsample_conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class Encoder(nn.Module):
    def __init__(
        self, *, hidden: int, mult: tuple[int, ...], n_blocks: int, z: int, cin: int, groups: int, dropout: float
    ) -> None:
        super().__init__()
        self.conv_in = _conv(cin, hidden, 3, bias=False)
        in_mult = (1, *mult)
        self.down = nn.ModuleList(
            _DownLevel(
                hidden * in_mult[i],
                hidden * mult[i],
                n_blocks,
                downsample=i != len(mult) - 1,
                groups=groups,
                dropout=dropout,
            )
            for i in range(len(mult))
        )
        mid = hidden * mult[-1]
        self.mid = nn.ModuleList(ResBlock(mid, mid, groups=groups, dropout=dropout) for _ in range(n_blocks))
        self.norm_out = _norm(mid, groups)
        self.conv_out = _conv(mid, z, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        for blk in self.mid:
            h = blk(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(
        self, *, hidden: int, mult: tuple[int, ...], n_blocks: int, z: int, cout: int, groups: int, dropout: float
    ) -> None:
        super().__init__()
        top = hidden * mult[-1]
        self.conv_in = _conv(z, top, 3)
        self.mid = nn.ModuleList(ResBlock(top, top, groups=groups, dropout=dropout) for _ in range(n_blocks))
        levels = []
        for i in range(len(mult)):
            cin = hidden * (mult[-1] if i == len(mult) - 1 else mult[i + 1])
            levels.append(_UpLevel(cin, hidden * mult[i], n_blocks, upsample=i != 0, groups=groups, dropout=dropout))
        self.up = nn.ModuleList(levels)  # indexed by level; run from the coarsest (last) to the finest (0)
        self.norm_out = _norm(hidden * mult[0], groups)
        self.conv_out = _conv(hidden * mult[0], cout, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for blk in self.mid:
            h = blk(h)
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Codebook(nn.Module):
    """``quantize.embedding``: nearest-neighbour (Euclidean) lookup, no projection.

    Calling it maps a latent [B, C, h, w] to raster tokens [B, h·w], so ``tokenizer.quantize(feature)`` is both
    the upstream module name (``quantize.embedding.weight`` in the checkpoint) and the contract's method.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(size, dim)
        self.embedding.weight.data.uniform_(-1.0 / size, 1.0 / size)

    def nearest(self, z_nc: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row of ``z_nc`` [N, C] (ties → lowest index)."""
        e = self.embedding.weight
        d = z_nc.square().sum(1, keepdim=True) + e.square().sum(1)[None] - 2.0 * z_nc @ e.T
        return d.argmin(1)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        b, c, h, w = feature.shape
        return self.nearest(feature.permute(0, 2, 3, 1).reshape(-1, c)).view(b, h * w)


class SingleScaleVQ(nn.Module):
    """MaskGIT-VQGAN tokenizer: encoder → nearest code per position → decoder (range [0, 1]).

    Defaults are the released ``maskgit-vqgan-imagenet-f16-256`` (128 channels, mult (1,1,2,2,4), 2 res blocks,
    z 256, 1024 codes, 256×256 → 16×16 tokens).
    """

    family_kind = "rar"

    def __init__(
        self,
        *,
        hidden_channels: int = 128,
        channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        z_channels: int = 256,
        codebook_size: int = 1024,
        image_size: int = 256,
        in_channels: int = 3,
        norm_groups: int = 32,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        mult = tuple(channel_mult)
        kw = dict(hidden=hidden_channels, mult=mult, n_blocks=num_res_blocks, z=z_channels, groups=norm_groups)
        self.encoder = Encoder(cin=in_channels, dropout=dropout, **kw)
        self.decoder = Decoder(cout=in_channels, dropout=dropout, **kw)
        self.quantize = Codebook(codebook_size, z_channels)
        self.vocab_size = codebook_size
        self.z_channels = z_channels
        self.image_size = image_size
        self.latent_size = image_size // 2 ** (len(mult) - 1)
        self.num_tokens = self.latent_size**2

    # ---- the TracingTokenizer contract ------------------------------------------------------------
    def encode_feature(self, images01: torch.Tensor) -> torch.Tensor:
        return self.encoder(images01)

    def tokens_to_latent(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n = tokens.shape
        side = round(n**0.5)
        return self.quantize.embedding(tokens).view(b, side, side, self.z_channels).permute(0, 3, 1, 2).contiguous()

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        return self.decoder(latent.float()).clamp(0.0, 1.0)

    def encoder_modules(self) -> list[nn.Module]:
        return [self.encoder]

    # ---- conveniences --------------------------------------------------------------------------------
    @property
    def codebook(self) -> torch.Tensor:
        return self.quantize.embedding.weight

    def encode_tokens(self, images01: torch.Tensor) -> torch.Tensor:
        return self.quantize(self.encode_feature(images01))

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.decode_latent(self.tokens_to_latent(tokens))
