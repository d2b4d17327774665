"""Joint training (the oracle): at task t, train on the data of tasks 0..t."""

from __future__ import annotations

from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from genattr.data.base import ContinualProtocol
from genattr.methods.continual.base import ContinualMethod
from genattr.methods.continual.memory import ExemplarMemory
from genattr.methods.continual.replay import SingleNet


class Joint(ContinualMethod):
    def build_net(self, backbone: nn.Module) -> SingleNet:
        return SingleNet(backbone)

    def training_data(self, task: int, protocol: ContinualProtocol, memory: ExemplarMemory) -> Dataset:
        sets = [protocol.tasks[i].train for i in range(task + 1)]
        return sets[0] if len(sets) == 1 else ConcatDataset(sets)
