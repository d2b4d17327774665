"""The expandable network every continual method trains.

A network is a list of feature *branches* (one LoRA adapter, one backbone copy, or a
single shared backbone), an :class:`ExpandingHead` over their concatenated features,
and an optional auxiliary head on the newest branch. LoRAX, DER and replay differ only
in what a branch is and which parameters train.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from genattr.models.heads import ExpandingHead, fresh_linear


class ContinualNet(nn.Module):
    """Base class: subclasses define branches, trainable parameters and (de)serialisation."""

    def __init__(self, feature_dim: int) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.head = ExpandingHead()
        self.aux_head: nn.Linear | None = None
        self.n_tasks = 0
        self.known_classes = 0
        self.total_classes = 0

    # -- subclass hooks -------------------------------------------------------------------
    @property
    def n_branches(self) -> int:
        raise NotImplementedError

    def add_branch(self, task: int) -> None:
        raise NotImplementedError

    def branch_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def branch_parameters(self) -> list[nn.Parameter]:
        """Parameters of the branches that train during the current task."""
        raise NotImplementedError

    def save_branches(self, folder: Path) -> None:
        raise NotImplementedError

    def load_branches(self, folder: Path) -> None:
        raise NotImplementedError

    # -- shared behaviour -----------------------------------------------------------------
    def begin_task(self, task: int, n_new_classes: int, aux_head: bool) -> None:
        """Add a branch, grow the head, and (from task 1 on) re-create the aux head."""
        self.add_branch(task)
        self.known_classes = self.total_classes
        self.total_classes += n_new_classes
        self.head.expand(self.n_branches * self.feature_dim, self.total_classes)
        device = self.head.fc.weight.device
        self.aux_head = self.new_aux_head(n_new_classes + 1).to(device) if aux_head and task > 0 else None
        self.n_tasks = task + 1

    def new_aux_head(self, out_features: int) -> nn.Linear:
        """The auxiliary head of a new task; DER's (``SimpleLinear``) is kaiming-uniform with a zero bias."""
        return fresh_linear(self.feature_dim, out_features)

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = list(self.branch_parameters()) + list(self.head.parameters())
        if self.aux_head is not None:
            params += list(self.aux_head.parameters())
        return params

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.branch_features(x), dim=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.features(x)
        out = {"logits": self.head(feats), "features": feats}
        if self.aux_head is not None and self.training:
            out["aux_logits"] = self.aux_head(feats[:, -self.feature_dim :])
        return out

    def aux_targets(self, y: torch.Tensor) -> torch.Tensor:
        """Old classes -> 0, new class k -> k - known + 1 (LoRAX div head and DER aux head)."""
        return torch.where(y < self.known_classes, torch.zeros_like(y), y - self.known_classes + 1)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.save_branches(folder)
        head = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
        save_file(head, str(folder / "head.safetensors"))

    def load(self, folder: Path) -> None:
        self.load_branches(folder)
        self.head.load_state_dict(load_file(str(folder / "head.safetensors")))
