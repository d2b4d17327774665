"""The contract every traced autoregressive generator fulfils (VAR next-scale, RAR raster order).

Scoring is teacher forced and deterministic: label dropout (VAR ``cond_drop_rate``) and random ordering
(RAR ``random_ratio``) are off and dropout is in eval mode whenever ``token_logits`` is called, because the
upstream forwards draw random numbers even in eval mode.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class TracedGenerator(Protocol):
    #: Number of real classes; ``null_class`` (== num_classes) is the unconditional label.
    num_classes: int
    null_class: int
    #: Tokens per image; must equal the tokenizer's ``num_tokens``.
    num_tokens: int

    def token_logits(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits [B, L, V]: position p predicts token p given the label and earlier tokens."""

    def guided_logits(self, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        """The sampler's own guided logits per position, from conditional and unconditional logits [B, L, V]
        (VAR: (1+t_s)ℓ_c − t_sℓ_u with t_s = cfg·s/(S−1); RAR: power-cosine ramp and temperature)."""

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Tokens [B, L] drawn with this variant's sampling settings (CFG, top-k/top-p or temperature)."""
