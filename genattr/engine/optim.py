"""Optimiser pieces every family builds the same way: the weight-decay groups."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn


def decays(name: str, param: nn.Parameter) -> bool:
    """timm's ``create_optimizer`` rule: matrices (LoRA factors included) decay; biases and 1-D
    parameters (norms, gates, embeddings' scalars) do not. LoRAX and GS-LoRA both inherit it from timm."""
    return param.ndim > 1 and not name.endswith(".bias")


def param_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    """Parameters split by :func:`decays` into a no-decay and a decay group (empty groups left out)."""
    named = list(named)
    groups = (
        {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if decays(n, p)], "weight_decay": float(weight_decay)},
    )
    return [g for g in groups if g["params"]]
