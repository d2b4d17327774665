"""What every forgetting method shares: settings, the per-task hooks, and the task loop entry.

GS-LoRA and the baselines differ only in (1) what they wrap or re-initialise at task
start, (2) which parameters train, (3) the passes a task makes over its data (the
:class:`EpochPlan`: GS-LoRA runs epochs over the remaining subset with forgotten batches
cycled beside them, the original's LwF/DER over the forgotten subset, L2/EWC/MAS over
the mixed union, SCRUB alternates forget and remain passes), (4) the loss of one step,
and (5) what happens at task end (merge the adapter). The loop in
:mod:`genattr.methods.forgetting.loop` owns data, optimiser, schedule, evaluation and
reports, and runs as a family of the engine (:mod:`genattr.engine.stages`: checkpoints,
resume, stop); every step goes through Accelerate (:mod:`genattr.engine.training`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from genattr.engine.training import shard
from genattr.methods.base import Report, RunContext
from genattr.utils.errors import ConfigError

if TYPE_CHECKING:
    from accelerate import Accelerator


@dataclass
class Batch:
    """One step: remaining images/labels and forgotten images/labels.

    A half the pass does not draw is empty (zero rows). ``extra`` is a further remaining
    batch from the same cycle (DER++'s next batch); ``phase`` is the pass's
    :attr:`EpochPlan.phase`.
    """

    xr: torch.Tensor
    yr: torch.Tensor
    xf: torch.Tensor
    yf: torch.Tensor
    extra: tuple[torch.Tensor, torch.Tensor] | None = None
    phase: str = ""


#: what one pass (loop epoch) runs over: the remaining subset, the forgotten subset, or both
#: mixed into one shuffled set (the original's ConcatDataset with ``--replay``)
EPOCH_OVER = ("remain", "forget", "union")


@dataclass(frozen=True)
class EpochPlan:
    """One pass over a task's data.

    ``over``: the set whose loader defines the pass; ``paired``: a batch of the other set is
    drawn beside each step from its own endless cycle (``engine_cl.py``'s prefetcher);
    ``extra_remain``: one more remaining batch per step from that cycle; ``evaluate``:
    mid-task evaluations may fall in this pass; ``phase``: a tag the method's loss reads.
    """

    lr: float
    over: str = "remain"
    paired: bool = True
    extra_remain: bool = False
    evaluate: bool = True
    phase: str = ""

    def __post_init__(self) -> None:
        if self.over not in EPOCH_OVER:
            raise ConfigError(f"an epoch runs over one of {list(EPOCH_OVER)}, not {self.over!r}")


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
    #: the run's accelerator (a sweep such as EWC's importance shares its batches out); None = one process
    accelerator: Accelerator | None = None


def check_one_step_per_batch(acc: Accelerator) -> None:
    """The forgetting recipes step the optimiser after every batch (their evaluation points, LR passes and
    cycled batches count steps), so gradient accumulation is refused rather than half supported."""
    if acc.gradient_accumulation_steps != 1:
        raise ConfigError(
            f"trainer.grad_accum={acc.gradient_accumulation_steps}: the forgetting methods step after every batch; "
            "set trainer.grad_accum=1 (raise trainer.batch_size, or use more processes, for a larger batch)."
        )


def process_rows(acc: Accelerator | None, n: int) -> range:
    """This process's rows of a global batch of ``n``: its :func:`~genattr.engine.training.shard`.

    Every process draws the same global batches (same generators) and trains on its rows, so the steps are
    those of one process with the same batch size. A batch with fewer rows than processes (a last partial
    batch) is trained whole by every process: their gradients are equal, so their average is the batch's.
    """
    if acc is None or acc.num_processes == 1 or n < acc.num_processes:
        return range(n)
    return shard(acc, n)


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


#: which point of a task a row reports: the mid-task evaluation with the highest H (the original's
#: best-H checkpoint) or the model at the end of the task
REPORT_POINTS = ("best_h", "last")


class ForgettingMethod:
    """Base of GS-LoRA and the forgetting baselines."""

    name = "forgetting"
    #: the default plan: every epoch runs over this set (with the other cycled beside it when ``paired``)
    epoch_over = "remain"
    paired = True

    def __init__(
        self,
        *,
        name: str,
        model: Mapping[str, Any],
        trainer: Mapping[str, Any],
        supports: Sequence[str] = ("forgetting",),
        lr: float | None = None,
        optimizer: str = "adamw",
        weight_decay: float | None = None,
        schedule: Mapping[str, Any] | None = None,
        bnd: float = 105.0,
        beta: float | Sequence[float] = 0.2,
        eval_margin: bool = True,
        h_reference: str = "task_start",
        report: str = "best_h",
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
        self.weight_decay = None if weight_decay is None else float(weight_decay)
        self.schedule = dict(schedule or {})
        unknown = set(self.schedule) - set(self.trainer["schedule"]) if self.schedule else set()
        if unknown:
            raise ConfigError(
                f"method.schedule has keys {sorted(unknown)} that trainer.schedule does not; "
                f"choose among {sorted(self.trainer['schedule'])}"
            )
        self.bnd = float(bnd)
        self.beta = beta
        self.eval_margin = bool(eval_margin)
        if h_reference not in ("pretrain", "task_start"):
            raise ConfigError(f"method.h_reference={h_reference} is unknown; choose pretrain or task_start")
        self.h_reference = h_reference
        if report not in REPORT_POINTS:
            raise ConfigError(f"method.report={report} is unknown; choose one of {list(REPORT_POINTS)}")
        self.report = report
        self.zero_tol = float(zero_tol)
        self.protocol: Any = None  # set by run()
        self.run_seed = 0

    # -- hooks ------------------------------------------------------------------------------
    def plan(self, lrs: Sequence[float], base_lr: float) -> list[EpochPlan]:
        """The passes of one task; ``lrs`` = the schedule's LR for each of ``trainer.epochs`` epochs."""
        return [EpochPlan(lr=float(lr), over=self.epoch_over, paired=self.paired) for lr in lrs]

    def begin_task(self, net: nn.Module, data: TaskData) -> nn.Module:
        """Return the module to train this task (``net`` itself, or ``net`` wrapped)."""
        return net

    def trainable(self, module: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in module.named_parameters() if p.requires_grad]

    def forget_labels(self, yf: torch.Tensor) -> torch.Tensor:
        """The labels the forgotten images of one global batch train with (the relabelling baselines draw
        new ones here, before the batch is shared out, so every process sees the same draw)."""
        return yf

    def loss(
        self, model: nn.Module, module: nn.Module, batch: Batch, t: int, epoch: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one step. ``model`` is what the forward passes call (the module as Accelerate
        prepared it: DDP on several processes, autocast under mixed precision); ``module`` is the trained
        module itself, whose parameters a penalty reads (the group lasso, L2 anchors, SCRUB-S's average)."""
        raise NotImplementedError

    def end_task(self, module: nn.Module, t: int) -> tuple[nn.Module, dict[str, Any]]:
        """Return the plain network to carry to the next task, and per-task statistics."""
        return module, {}

    def end_epoch(self, module: nn.Module, t: int, k: int) -> None:
        """Called after pass ``k`` of task ``t`` (SCRUB-S updates its averaged model here)."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """What the method carries across tasks (EWC terms, SCRUB-S's average), for the task checkpoint."""
        return {}

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`state_tensors` when a run resumes."""

    def params(self) -> dict[str, Any]:
        return {}

    def run(self, protocol: Any, ctx: RunContext) -> Report:
        from genattr.methods.forgetting.loop import ForgettingLoop

        # a method that builds models or draws data of its own (Retrain, the importance of EWC/MAS) reads these
        self.protocol, self.run_seed = protocol, int(ctx.seed)
        return ForgettingLoop(self, protocol, ctx).run()
