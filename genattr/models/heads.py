"""Classifier heads that grow with the number of tasks."""

from __future__ import annotations

import torch
from torch import nn


def fresh_linear(in_features: int, out_features: int) -> nn.Linear:
    """Linear layer with the init LoRAX / DyTox use: kaiming-uniform (linear gain), zero bias."""
    layer = nn.Linear(in_features, out_features)
    nn.init.kaiming_uniform_(layer.weight, nonlinearity="linear")
    nn.init.zeros_(layer.bias)
    return layer


class ExpandingHead(nn.Module):
    """A linear classifier over concatenated features that gains inputs and classes.

    ``expand`` builds a fresh layer and copies the old weights into its top-left block
    (old classes x old features); old-class weights on new features and all new-class
    rows keep their fresh init, exactly as LoRAX's ``reset_classifier``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fc: nn.Linear | None = None

    @property
    def out_features(self) -> int:
        return 0 if self.fc is None else self.fc.out_features

    @property
    def in_features(self) -> int:
        return 0 if self.fc is None else self.fc.in_features

    def expand(self, in_features: int, out_features: int) -> None:
        new = fresh_linear(in_features, out_features)
        if self.fc is not None:
            old = self.fc
            if old.in_features > in_features or old.out_features > out_features:
                raise ValueError("a head can only grow")
            with torch.no_grad():
                new.weight[: old.out_features, : old.in_features] = old.weight
                new.bias[: old.out_features] = old.bias
            new = new.to(old.weight.device, old.weight.dtype)
        self.fc = new

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.fc is None:
            raise RuntimeError("head used before the first task")
        return self.fc(features)
