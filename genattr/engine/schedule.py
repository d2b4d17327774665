"""The LoRAX/DyTox per-epoch learning-rate schedule as an explicit, testable function.

The original code builds a timm ``CosineLRScheduler`` (old timm, ``warmup_prefix=False``,
one cycle, no noise) and calls ``scheduler.step(epoch)`` *after* each epoch. Writing
the schedule out as a pure function makes its quirks visible and unit-testable
instead of depending on a particular timm version:

* ``warmup_lr`` (1e-4) exceeds the scaled base LR, so the "warmup" *decreases* the LR;
* for task 0 ``min_lr`` (1e-5) exceeds the base LR (6.25e-6), so the cosine *rises*;
* stepping after the epoch means epochs 0 and 1 both train at ``lr(0)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol


class _HasParamGroups(Protocol):
    """Anything shaped like a torch optimizer; avoids importing torch here."""

    param_groups: list[dict[str, Any]]


def linear_scaled_lr(base_lr: float, batch_size: int, world_size: int, reference: int = 512) -> float:
    """Goyal et al. linear scaling as in ``main_lorax.py``: ``base * batch * world / reference``.

    Keeping the global batch and this scaling together is what makes the paper's
    effective LRs (6.25e-6 and 3.125e-5 at batch 32) reproducible under DDP.
    """
    if batch_size < 1 or world_size < 1 or reference < 1:
        raise ValueError("batch_size, world_size and reference must be positive")
    return base_lr * batch_size * world_size / reference


def cosine_lr(
    t: int,
    *,
    base_lr: float,
    epochs: int,
    warmup_epochs: int,
    warmup_lr: float,
    min_lr: float,
) -> float:
    """timm ``CosineLRScheduler._get_lr(t)`` for one cycle with ``warmup_prefix=False``.

    Warmup interpolates linearly from ``warmup_lr`` towards ``base_lr``; afterwards the
    cosine is evaluated at the *unshifted* ``t`` (the warmup overlaps the cosine), and
    past ``epochs`` the single cycle is over and timm holds ``min_lr``.
    """
    if t < 0:
        raise ValueError(f"t must be >= 0, got {t}")
    if epochs < 1 or warmup_epochs < 0:
        raise ValueError(f"need epochs >= 1 and warmup_epochs >= 0, got {epochs}, {warmup_epochs}")
    if t < warmup_epochs:
        return warmup_lr + t * (base_lr - warmup_lr) / warmup_epochs
    if t >= epochs:
        return min_lr
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * t / epochs))


def epoch_lr(
    epoch: int,
    *,
    base_lr: float,
    epochs: int,
    warmup_epochs: int,
    warmup_lr: float,
    min_lr: float,
    step_after_epoch: bool = True,
) -> float:
    """The LR in effect while training ``epoch`` (0-based).

    With ``step_after_epoch=True`` (the original loop, default) the scheduler value
    for ``epoch - 1`` is still active, so epoch ``e`` trains at ``lr(max(e - 1, 0))``.
    ``step_after_epoch=False`` gives the textbook ``lr(e)``, offered as an ablation.
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    t = max(epoch - 1, 0) if step_after_epoch else epoch
    return cosine_lr(
        t,
        base_lr=base_lr,
        epochs=epochs,
        warmup_epochs=warmup_epochs,
        warmup_lr=warmup_lr,
        min_lr=min_lr,
    )


def epoch_lrs(schedule: Mapping[str, Any], base_lr: float, epochs: int) -> list[float]:
    """The LR of every epoch of a stage from a ``trainer.schedule`` mapping (the schedule is re-created per
    task, as LoRAX's and GS-LoRA's originals do); ``step_after_epoch`` as in :func:`epoch_lr`."""
    return [
        epoch_lr(
            epoch,
            base_lr=base_lr,
            epochs=epochs,
            warmup_epochs=int(schedule["warmup_epochs"]),
            warmup_lr=float(schedule["warmup_lr"]),
            min_lr=float(schedule["min_lr"]),
            step_after_epoch=bool(schedule["step_after_epoch"]),
        )
        for epoch in range(epochs)
    ]


def set_lr(optimizer: _HasParamGroups, lr: float) -> None:
    """Set the same LR on every parameter group, as timm's scheduler does."""
    for group in optimizer.param_groups:
        group["lr"] = lr
