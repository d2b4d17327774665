"""What every forgetting method shares: settings, the per-task hooks, and the task loop entry.

GS-LoRA and the baselines differ only in (1) what they wrap or re-initialise at task
start, (2) which parameters train, (3) the loss of one paired step (a remaining batch
and a forgotten batch), and (4) what happens at task end (merge the adapter). The loop
in :mod:`genattr.methods.forgetting.loop` owns data, optimiser, schedule, evaluation,
checkpoints and reports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from genattr.methods.base import Report, RunContext
from genattr.utils.errors import ConfigError


@dataclass
class Batch:
    """One paired step: remaining images/labels and (cycled) forgotten images/labels."""

    xr: torch.Tensor
    yr: torch.Tensor
    xf: torch.Tensor
    yf: torch.Tensor


@dataclass
class TaskData:
    """What a method may look at when a task begins (importance, prototypes, teachers)."""

    index: int
    forget_classes: tuple[int, ...]
    remain_classes: tuple[int, ...]
    remain: Dataset
    forget: Dataset
    device: torch.device
    batch_size: int
    n_classes: int
    eval_margin: bool


def per_task(values: float | Sequence[float], t: int) -> float:
    """A per-task list (``cl_beta_list``); the last value repeats for later tasks."""
    if isinstance(values, int | float):
        return float(values)
    values = list(values)
    if not values:
        raise ConfigError("a per-task list in the method config is empty")
    return float(values[min(t, len(values) - 1)])


def bounded_forget_loss(logits_f: torch.Tensor, yf: torch.Tensor, bnd: float) -> torch.Tensor:
    """ReLU(BND - CE on forgotten data): push CE up until BND, then no gradient."""
    return F.relu(bnd - F.cross_entropy(logits_f, yf))


class ForgettingMethod:
    """Base of GS-LoRA and the forgetting baselines."""

    name = "forgetting"

    def __init__(
        self,
        *,
        name: str,
        model: Mapping[str, Any],
        trainer: Mapping[str, Any],
        supports: Sequence[str] = ("forgetting",),
        lr: float | None = None,
        optimizer: str = "adamw",
        bnd: float = 105.0,
        beta: float | Sequence[float] = 0.2,
        eval_margin: bool = True,
        h_reference: str = "pretrain",
        zero_tol: float = 1e-3,
    ) -> None:
        self.name = name
        self.supports = tuple(supports)
        self.model_cfg = dict(model)
        self.trainer = dict(trainer)
        self.lr = None if lr is None else float(lr)
        if optimizer not in ("adamw", "adam"):
            raise ConfigError(f"method.optimizer={optimizer} is unknown; choose adamw or adam")
        self.optimizer = optimizer
        self.bnd = float(bnd)
        self.beta = beta
        self.eval_margin = bool(eval_margin)
        if h_reference not in ("pretrain", "task_start"):
            raise ConfigError(f"method.h_reference={h_reference} is unknown; choose pretrain or task_start")
        self.h_reference = h_reference
        self.zero_tol = float(zero_tol)

    # -- hooks ------------------------------------------------------------------------------
    def begin_task(self, net: nn.Module, data: TaskData) -> nn.Module:
        """Return the module to train this task (``net`` itself, or ``net`` wrapped)."""
        return net

    def trainable(self, module: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in module.named_parameters() if p.requires_grad]

    def loss(self, module: nn.Module, batch: Batch, t: int, epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def end_task(self, module: nn.Module, t: int) -> tuple[nn.Module, dict[str, Any]]:
        """Return the plain network to carry to the next task, and per-task statistics."""
        return module, {}

    def params(self) -> dict[str, Any]:
        return {}

    def run(self, protocol: Any, ctx: RunContext) -> Report:
        from genattr.methods.forgetting.loop import ForgettingLoop

        return ForgettingLoop(self, protocol, ctx).run()
