"""What every continual method shares: config, training data, loss, and the task loop."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from genattr.data.base import ContinualProtocol
from genattr.methods.base import Report, RunContext
from genattr.methods.continual.memory import ExemplarMemory
from genattr.methods.continual.network import ContinualNet


class ContinualMethod:
    """Base of LoRAX, DER, replay and joint; subclasses override only where papers differ."""

    name = "continual"

    def __init__(
        self,
        *,
        name: str,
        model: Mapping[str, Any],
        trainer: Mapping[str, Any],
        memory: Mapping[str, Any],
        supports: tuple[str, ...] | list[str] = ("continual",),
        aux_weight: float = 0.0,
    ) -> None:
        self.name = name
        self.supports = tuple(supports)
        self.model_cfg = dict(model)
        self.trainer = dict(trainer)
        self.memory_cfg = dict(memory)
        self.aux_weight = float(aux_weight)

    # -- hooks ------------------------------------------------------------------------------
    def build_net(self, backbone: nn.Module) -> ContinualNet:
        raise NotImplementedError

    def training_data(self, task: int, protocol: ContinualProtocol, memory: ExemplarMemory) -> Dataset:
        """The task's training set plus the exemplar memory (concatenated, sampled uniformly)."""
        current = protocol.tasks[task].train
        if len(memory) == 0:
            return current
        return ConcatDataset([current, memory.dataset(current)])

    def loss(self, net: ContinualNet, out: dict[str, torch.Tensor], y: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.cross_entropy(out["logits"], y)
        if self.aux_weight and "aux_logits" in out:
            loss = loss + self.aux_weight * nn.functional.cross_entropy(out["aux_logits"], net.aux_targets(y))
        return loss

    def params(self) -> dict[str, Any]:
        """Method facts worth logging beside the config (e.g. parameter counts)."""
        return {}

    def run(self, protocol: ContinualProtocol, ctx: RunContext) -> Report:
        from genattr.methods.continual.loop import ContinualLoop

        return ContinualLoop(self, protocol, ctx).run()
