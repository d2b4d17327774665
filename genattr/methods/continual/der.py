"""DER without pruning (Yan et al., 2021; as in PyCIL): a full backbone copy per task.

Each new branch starts as a copy of the previous one; old branches are frozen and kept
in eval mode. An auxiliary head (1 "old" + the new classes) on the newest branch is
trained with weight 1.0. This is LoRAX's structural parent with full-rank branches.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from genattr.methods.continual.base import ContinualMethod
from genattr.methods.continual.network import ContinualNet
from genattr.models.backbones import feature_dim
from genattr.utils.weights import state_dict_cpu


class DERNet(ContinualNet):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__(feature_dim(backbone))
        self._template = backbone
        self.branches = nn.ModuleList()

    @property
    def n_branches(self) -> int:
        return len(self.branches)

    def add_branch(self, task: int) -> None:
        source = self.branches[-1] if len(self.branches) else self._template
        new = copy.deepcopy(source)
        for old in self.branches:
            old.requires_grad_(False)
            old.eval()
        new.requires_grad_(True)
        self.branches.append(new)

    def train(self, mode: bool = True) -> DERNet:
        super().train(mode)
        for old in list(self.branches)[:-1]:
            old.eval()
        return self

    def branch_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        with torch.no_grad():
            for old in list(self.branches)[:-1]:
                feats.append(old(x))
        feats.append(self.branches[-1](x))
        return feats

    def branch_parameters(self) -> list[nn.Parameter]:
        return list(self.branches[-1].parameters())

    def save_branches(self, folder: Path) -> None:
        for i, branch in enumerate(self.branches):
            save_file(state_dict_cpu(branch), str(folder / f"branch_{i}.safetensors"))

    def load_branches(self, folder: Path) -> None:
        for i, branch in enumerate(self.branches):
            branch.load_state_dict(load_file(str(folder / f"branch_{i}.safetensors")))


class DER(ContinualMethod):
    def build_net(self, backbone: nn.Module) -> DERNet:
        return DERNet(backbone)
