"""Pieces both generator families share: deterministic scoring mode, top-k / top-p sampling, the KV cache."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def scoring_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (dropout / drop-path off) for the duration of a scoring call, restoring the caller's mode.

    Upstream forwards draw random numbers even in eval mode (label drop) or when left in train mode
    (dropout), so every ``token_logits`` goes through here and two calls always agree.
    """
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def top_k_top_p_mask(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Boolean mask [..., V] of the tokens a top-k / top-p sampler can draw (``0`` disables either filter).

    Mirrors VAR's ``sample_with_top_k_top_p_``: top-k keeps the k largest logits, top-p keeps the smallest set
    whose probability mass reaches ``top_p`` (always at least the most likely token).
    """
    keep = torch.ones_like(logits, dtype=torch.bool)
    v = logits.shape[-1]
    if 0 < top_k < v:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        keep &= logits >= kth
    if 0.0 < top_p < 1.0:
        sorted_logits, order = logits.masked_fill(~keep, float("-inf")).sort(dim=-1, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum <= 1 - top_p
        drop_sorted[..., -1] = False
        drop = torch.zeros_like(keep).scatter(-1, order, drop_sorted)
        keep &= ~drop
    return keep


def sample_logits(
    logits: torch.Tensor, generator: torch.Generator, *, top_k: int = 0, top_p: float = 0.0
) -> torch.Tensor:
    """One token per row of ``logits`` [B, l, V] → [B, l], drawn with ``generator`` (reproducible)."""
    masked = logits.masked_fill(~top_k_top_p_mask(logits, top_k, top_p), float("-inf"))
    probs = masked.float().softmax(-1)
    b, n, v = probs.shape
    return torch.multinomial(probs.view(-1, v), 1, generator=generator).view(b, n)


class KVCache:
    """Keys and values of the positions a sampler has already run, one entry per transformer block.

    Why: without it every sampling step re-runs the whole prefix, so RAR's 256 raster steps cost ~L²/2 token
    passes instead of L (VAR's 10 scales, ~3×). Scoring never uses it: teacher forcing is one pass anyway.
    """

    def __init__(self, n_blocks: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * n_blocks
        self.values: list[torch.Tensor | None] = [None] * n_blocks

    def extend(self, block: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's ``k`` / ``v`` [B, H, m, d] to block ``block``; returns everything cached so far."""
        old_k, old_v = self.keys[block], self.values[block]
        if old_k is not None and old_v is not None:
            k, v = torch.cat((old_k, k), 2), torch.cat((old_v, v), 2)
        self.keys[block], self.values[block] = k, v
        return k, v

    @property
    def length(self) -> int:
        """Number of positions cached (0 before the first step)."""
        first = self.keys[0] if self.keys else None
        return 0 if first is None else first.shape[2]
