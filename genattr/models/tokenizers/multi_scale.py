"""Multi-scale residual VQ autoencoder in the layout of VAR's ``VQVAE`` (``vae_ch160v4096z32.pth``).

Module and parameter names (``encoder.down.{i}.block.{j}``, ``encoder.mid.attn_1.qkv``, ``quant_conv``,
``quantize.quant_resi.qresi_ls.{k}``, ``quantize.embedding``, ``quantize.ema_vocab_hit_SV``...) follow
``FoundationVision/VAR`` so the released file loads with ``strict=True``. The released size is
``MultiScaleVQ()`` with its defaults; the twin's ``tinyvar`` is the same class with fewer channels/levels,
``patch_nums=(1, 2, 4, 8)`` and two partially shared φ.

Why every residual step lives in one place (:meth:`ResidualQuantizer.scale_to_full`): greedy quantisation,
token decoding, the teacher-forcing input and Algorithm 3's soft decoding must all apply *exactly* the same
bicubic-up + φ map, or the exact-latent targets and the recovered tokens drift apart.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from genattr.utils.errors import ConfigError


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """LDM residual block (biased 3×3 convs, 1×1 ``nin_shortcut`` on the input when channels change)."""

    def __init__(self, cin: int, cout: int, *, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, groups)
        self.dropout = nn.Dropout(dropout) if dropout > 1e-6 else nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a fused 1×1 ``qkv`` conv (scale C^-½)."""

    def __init__(self, channels: int, *, groups: int) -> None:
        super().__init__()
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        attn = torch.softmax(q.transpose(1, 2) @ k * c**-0.5, dim=2)  # [B, HW_q, HW_k]
        out = (v @ attn.transpose(1, 2)).view(b, c, h, w)
        return x + self.proj_out(out)


class Downsample2x(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as in LDM


class Upsample2x(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, channels: int, *, groups: int, dropout: float, attn: bool) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups=groups, dropout=dropout)
        self.attn_1 = AttnBlock(channels, groups=groups) if attn else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, groups=groups, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution: ``block`` (+ ``attn`` at the lowest resolution) and an optional resampler."""

    def __init__(self, cin: int, cout: int, n: int, *, groups: int, dropout: float, attn: bool) -> None:
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(cin if i == 0 else cout, cout, groups=groups, dropout=dropout) for i in range(n)
        )
        self.attn = nn.ModuleList(AttnBlock(cout, groups=groups) for _ in range(n)) if attn else nn.ModuleList()

    def run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        for i, blk in enumerate(self.block):
            h = blk(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class Encoder(nn.Module):
    def __init__(
        self,
        *,
        ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        z_channels: int,
        in_channels: int,
        groups: int,
        dropout: float,
        using_sa: bool,
        using_mid_sa: bool,
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        in_mult = (1, *ch_mult)
        self.down = nn.ModuleList()
        last = len(ch_mult) - 1
        for i, m in enumerate(ch_mult):
            level = _Level(
                ch * in_mult[i], ch * m, num_res_blocks, groups=groups, dropout=dropout, attn=using_sa and i == last
            )
            if i != last:
                level.downsample = Downsample2x(ch * m)
            self.down.append(level)
        top = ch * ch_mult[-1]
        self.mid = _Mid(top, groups=groups, dropout=dropout, attn=using_mid_sa)
        self.norm_out = _norm(top, groups)
        self.conv_out = nn.Conv2d(top, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level.run_blocks(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(
        self,
        *,
        ch: int,
        ch_mult: tuple[int, ...],
        num_res_blocks: int,
        z_channels: int,
        in_channels: int,
        groups: int,
        dropout: float,
        using_sa: bool,
        using_mid_sa: bool,
    ) -> None:
        super().__init__()
        last = len(ch_mult) - 1
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, groups=groups, dropout=dropout, attn=using_mid_sa)
        levels: list[_Level] = []
        for i in reversed(range(len(ch_mult))):
            level = _Level(
                block_in,
                ch * ch_mult[i],
                num_res_blocks + 1,
                groups=groups,
                dropout=dropout,
                attn=using_sa and i == last,
            )
            block_in = ch * ch_mult[i]
            if i != 0:
                level.upsample = Upsample2x(block_in)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, in_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level.run_blocks(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Phi(nn.Conv2d):
    """φ(h) = (1 − r)·h + r·conv3×3(h) with r = ``quant_resi`` (0.5 in VAR)."""

    def __init__(self, channels: int, ratio: float) -> None:
        super().__init__(channels, channels, 3, padding=1)
        self.resi_ratio = abs(ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mul(1 - self.resi_ratio) + super().forward(h).mul(self.resi_ratio)


class PhiPartiallyShared(nn.Module):
    """K φ convolutions shared across S scales: scale si uses the φ whose tick is nearest to si/(S−1)."""

    def __init__(self, phis: nn.ModuleList) -> None:
        super().__init__()
        self.qresi_ls = phis
        k = len(phis)
        self.ticks = np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)

    def index(self, at: float) -> int:
        return int(np.argmin(np.abs(self.ticks - at)))

    def __getitem__(self, at: float) -> Phi:
        return self.qresi_ls[self.index(at)]


class ResidualQuantizer(nn.Module):
    """VAR's ``VectorQuantizer2`` for inference: greedy residual quantisation over ``patch_nums``.

    Calling it maps a latent f [B, C, H, W] to greedy tokens [B, Σpn²] (Alg. 2), so ``tokenizer.quantize(f)``
    is both the upstream module name and the contract's method.
    """

    def __init__(
        self, vocab_size: int, cvae: int, patch_nums: tuple[int, ...], quant_resi: float, share_quant_resi: int
    ) -> None:
        super().__init__()
        if share_quant_resi < 2:
            raise ConfigError(
                f"model.share_quant_resi={share_quant_resi} is not supported; genattr implements VAR's partially "
                "shared φ (share_quant_resi >= 2, the released value is 4)"
            )
        self.vocab_size, self.Cvae, self.patch_nums = vocab_size, cvae, tuple(patch_nums)
        self.quant_resi = PhiPartiallyShared(nn.ModuleList(Phi(cvae, quant_resi) for _ in range(share_quant_resi)))
        # usage statistics of VAE training; kept only because the released checkpoint carries them
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), vocab_size))
        self.embedding = nn.Embedding(vocab_size, cvae)

    # --- the one residual step ---------------------------------------------------------------------
    def phi(self, si: int) -> Phi:
        """The φ used at scale ``si`` (partially shared)."""
        return self.quant_resi[si / (len(self.patch_nums) - 1)]

    def scale_to_full(self, si: int, h_small: torch.Tensor) -> torch.Tensor:
        """φ_si(bicubic_up(h)) for a pn×pn code map [B, C, pn, pn] (the last scale is not resampled)."""
        full = self.patch_nums[-1]
        if h_small.shape[-1] != full:
            h_small = F.interpolate(h_small, size=(full, full), mode="bicubic")
        return self.phi(si)(h_small)

    def code_map(self, idx: torch.Tensor) -> torch.Tensor:
        """Embeddings of tokens [B, pn²] as a map [B, C, pn, pn]."""
        b, n = idx.shape
        pn = round(n**0.5)
        return self.embedding(idx).transpose(1, 2).reshape(b, self.Cvae, pn, pn)

    def split(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Flat tokens [B, L'] → per-scale [B, pn²] for every complete scale in the prefix."""
        out, start = [], 0
        for pn in self.patch_nums:
            if start + pn * pn > tokens.shape[1]:
                break
            out.append(tokens[:, start : start + pn * pn])
            start += pn * pn
        return out

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        b, c, h, w = f.shape
        if self.patch_nums[-1] != h or h != w:
            raise ValueError(f"latent {h}x{w} does not match patch_nums[-1]={self.patch_nums[-1]}")
        f_rest = f.detach().float().clone()
        e = self.embedding.weight
        e_sq = e.square().sum(1)
        out = []
        for si, pn in enumerate(self.patch_nums):
            z = F.interpolate(f_rest, size=(pn, pn), mode="area") if pn != h else f_rest
            z_nc = z.permute(0, 2, 3, 1).reshape(-1, c)
            idx = (z_nc.square().sum(1, keepdim=True) + e_sq[None] - 2.0 * z_nc @ e.T).argmin(1).view(b, pn * pn)
            f_rest = f_rest - self.scale_to_full(si, self.code_map(idx))
            out.append(idx)
        return torch.cat(out, 1)

    def latent_from_maps(self, maps: list[torch.Tensor]) -> torch.Tensor:
        """f̂ = Σ_s φ_s(up(h_s)) for code maps (hard embeddings or Alg. 3's expected embeddings)."""
        f_hat = None
        for si, h in enumerate(maps):
            term = self.scale_to_full(si, h)
            f_hat = term if f_hat is None else f_hat + term
        return f_hat

    def teacher_forcing_input(self, tokens: torch.Tensor) -> torch.Tensor:
        """Inputs of the scales after each complete scale in ``tokens``: [B, Σ_{s=1..k} pn_s², C].

        For the full token set this is upstream ``idxBl_to_var_input`` ([B, L − pn_0², C]); for a prefix of k
        complete scales it is exactly the first part of that, which is what the step-by-step sampler feeds.
        """
        scales = self.split(tokens)
        b, full = tokens.shape[0], self.patch_nums[-1]
        f_hat = torch.zeros(b, self.Cvae, full, full, device=tokens.device, dtype=torch.float32)
        nxt = []
        for si, idx in enumerate(scales):
            if si == len(self.patch_nums) - 1:
                break
            f_hat = f_hat + self.scale_to_full(si, self.code_map(idx))
            pn = self.patch_nums[si + 1]
            nxt.append(F.interpolate(f_hat, size=(pn, pn), mode="area").view(b, self.Cvae, -1).transpose(1, 2))
        if not nxt:
            return torch.zeros(b, 0, self.Cvae, device=tokens.device)
        return torch.cat(nxt, 1)


class MultiScaleVQ(nn.Module):
    """VAR tokenizer: f = quant_conv(encoder(2x − 1)); greedy residual tokens; x̂ = decoder(post_quant_conv(f̂)).

    Defaults are the released ``vae_ch160v4096z32`` (ch 160, mult (1,1,2,2,4), z 32, V 4096, 10 scales, 4 φ).
    """

    family_kind = "var"

    def __init__(
        self,
        *,
        vocab_size: int = 4096,
        z_channels: int = 32,
        ch: int = 160,
        ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        dropout: float = 0.0,
        quant_conv_ks: int = 3,
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
        patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
        using_sa: bool = True,
        using_mid_sa: bool = True,
        norm_groups: int = 32,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        dd = dict(
            ch=ch,
            ch_mult=tuple(ch_mult),
            num_res_blocks=num_res_blocks,
            z_channels=z_channels,
            in_channels=in_channels,
            groups=norm_groups,
            dropout=dropout,
            using_sa=using_sa,
            using_mid_sa=using_mid_sa,
        )
        self.encoder = Encoder(**dd)
        self.decoder = Decoder(**dd)
        self.quantize = ResidualQuantizer(vocab_size, z_channels, tuple(patch_nums), quant_resi, share_quant_resi)
        self.quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, padding=quant_conv_ks // 2)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, padding=quant_conv_ks // 2)
        self.vocab_size = vocab_size
        self.Cvae = z_channels
        self.patch_nums = tuple(patch_nums)
        self.num_tokens = sum(p * p for p in self.patch_nums)
        self.image_size = self.patch_nums[-1] * 2 ** (len(ch_mult) - 1)

    # ---- the MultiScaleTokenizer contract ------------------------------------------------------------
    def encode_feature(self, images01: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(images01 * 2.0 - 1.0))

    def tokens_to_latent(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.quantize.latent_from_maps([self.quantize.code_map(t) for t in self.quantize.split(tokens)])

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(latent.float())).clamp(-1.0, 1.0).add(1.0).mul(0.5)

    def encoder_modules(self) -> list[nn.Module]:
        return [self.encoder, self.quant_conv]

    def teacher_forcing_input(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.quantize.teacher_forcing_input(tokens)

    # ---- pieces Algorithm 3 and the generators use ---------------------------------------------------
    @property
    def codebook(self) -> torch.Tensor:
        return self.quantize.embedding.weight

    def scale_slices(self) -> list[slice]:
        out, start = [], 0
        for pn in self.patch_nums:
            out.append(slice(start, start + pn * pn))
            start += pn * pn
        return out

    def encode_tokens(self, images01: torch.Tensor) -> torch.Tensor:
        return self.quantize(self.encode_feature(images01))

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.decode_latent(self.tokens_to_latent(tokens))
