"""Fine-tuning of one shared backbone with exemplar replay (the paper's lower bound)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from genattr.methods.continual.base import ContinualMethod
from genattr.methods.continual.network import ContinualNet
from genattr.models.backbones import feature_dim
from genattr.utils.weights import state_dict_cpu


class SingleNet(ContinualNet):
    """One backbone, fully trainable, whose head grows with the classes."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__(feature_dim(backbone))
        self.backbone = backbone
        self.backbone.requires_grad_(True)

    @property
    def n_branches(self) -> int:
        return 1

    def add_branch(self, task: int) -> None:
        """The single branch is shared by all tasks; nothing to add."""

    def branch_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.backbone(x)]

    def branch_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())

    def save_branches(self, folder: Path) -> None:
        save_file(state_dict_cpu(self.backbone), str(folder / "backbone.safetensors"))

    def load_branches(self, folder: Path) -> None:
        self.backbone.load_state_dict(load_file(str(folder / "backbone.safetensors")))


class Replay(ContinualMethod):
    def build_net(self, backbone: nn.Module) -> SingleNet:
        return SingleNet(backbone)
