"""The contract every tracing tokenizer fulfils, so Stage 1 / Stage 2 / PRADA never branch on the family.

Token layout is one flat ``LongTensor[B, L]`` for both families: single-scale tokens in raster order
(L = h·w), multi-scale tokens concatenated scale by scale (L = Σ pn²). Images enter and leave as float
tensors in **[0, 1]**; each tokenizer converts to its own value range internally (RAR [0, 1], VAR [−1, 1]),
because forgetting that conversion silently ruins every signal.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class TracingTokenizer(Protocol):
    #: "rar" (single-scale) or "var" (multi-scale residual).
    family_kind: str
    #: Number of codebook entries.
    vocab_size: int
    #: Tokens per image (256 for real RAR, 680 for real VAR).
    num_tokens: int

    def encode_feature(self, images01: torch.Tensor) -> torch.Tensor:
        """D⁻¹: the continuous latent f [B, C, h, w] (VAR: after ``quant_conv``)."""

    def quantize(self, feature: torch.Tensor) -> torch.Tensor:
        """Greedy tokens [B, L] of a latent (nearest code; VAR: greedy residual over scales)."""

    def tokens_to_latent(self, tokens: torch.Tensor) -> torch.Tensor:
        """Q⁻¹: the exact quantised latent f_Z [B, C, h, w] of tokens (VAR: Σ φ_s(up(E[idx_s])))."""

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """D: image in [0, 1] (VAR: ``post_quant_conv`` + decoder, clamp, (x+1)/2), float32."""

    def encoder_modules(self) -> list[nn.Module]:
        """Modules the inverse decoder fine-tunes (RAR: encoder; VAR: encoder + quant_conv)."""


@runtime_checkable
class MultiScaleTokenizer(TracingTokenizer, Protocol):
    #: Side length of each scale, e.g. (1, 2, 3, 4, 5, 6, 8, 10, 13, 16).
    patch_nums: tuple[int, ...]

    def teacher_forcing_input(self, tokens: torch.Tensor) -> torch.Tensor:
        """Inputs of scales 1..S−1 for the transformer, [B, L − 1, C] (``idxBl_to_var_input``)."""
