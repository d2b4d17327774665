"""Accelerate around every training loop and every data-parallel sweep, written once.

Every family trains through :func:`prepared` + :func:`optimizer_step`, so the model, optimiser, loader and
scheduler are always ``prepare``-d together (DDP wrapping and sharding on several processes, the GradScaler under
fp16, device placement), the forward always runs under ``autocast`` (bf16 / fp16 mean what they say) and
``backward`` always goes through the accelerator. Sweeps that only read a model (loss sweeps, Fisher, feature
extraction) shard their items with :func:`shard` and put the pieces back with :func:`gather_rows`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from genattr.utils.errors import ConfigError

log = logging.getLogger(__name__)

#: ``trainer.max_steps`` of the run in this process (set by :func:`set_max_steps` when the run's accelerator is
#: made): every :func:`prepared` training stops after that many optimiser steps. ``None``: train the whole recipe.
_MAX_STEPS: int | None = None


def set_max_steps(value: Any) -> int | None:
    """Cap every training of this run at ``value`` optimiser steps per stage (``trainer.max_steps``; ``None``: no
    cap). The cap belongs to the engine, not to a family, so that one key shortens every loop there is -- a task,
    a window, a forgetting task, a retrain, an inverse decoder, a score function -- and a new family gets it for
    free (``make smoke-paper`` runs every paper preset for 2 steps a stage at full size)."""
    global _MAX_STEPS
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"trainer.max_steps={value!r} must be a whole number >= 1, or null for the whole recipe")
    _MAX_STEPS = value
    return value


@dataclass
class Prepared:
    """What :func:`prepared` hands back: the wrapped objects to train with (``loader`` / ``scheduler`` may be
    ``None``), and the raw model, whose state is what a checkpoint keeps."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: Any = None
    scheduler: Any = None
    raw: nn.Module | None = None
    #: optimiser steps taken (accumulation windows closed) and the run's ``trainer.max_steps``
    steps: int = 0
    max_steps: int | None = None

    @property
    def capped(self) -> bool:
        """True once ``trainer.max_steps`` optimiser steps ran: the loop stops training this stage here."""
        return self.max_steps is not None and self.steps >= self.max_steps


@contextmanager
def prepared(
    acc: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Any = None,
    scheduler: Any = None,
) -> Iterator[Prepared]:
    """``acc.prepare`` the objects of one training stage, and undo it when the stage ends.

    On exit every process waits for the others, the model gets its own ``forward`` back (mixed precision wraps
    it) and Accelerate drops its references, so the next stage prepares fresh objects around the same module.
    """
    objs: list[Any] = [model, optimizer]
    if loader is not None:
        objs.append(loader)
    if scheduler is not None:
        objs.append(scheduler)
    out = list(acc.prepare(*objs))
    p = Prepared(model=out[0], optimizer=out[1], raw=model, max_steps=_MAX_STEPS)
    if loader is not None:
        p.loader = out[2]
    if scheduler is not None:
        p.scheduler = out[-1]
    try:
        yield p
    finally:
        acc.wait_for_everyone()
        acc.unwrap_model(p.model, keep_fp32_wrapper=False)
        acc.free_memory()


@contextmanager
def prepared_alone(acc: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[Prepared]:
    """``prepared`` for a fit that runs on this process alone while the others fit other models: device
    placement, the mixed-precision forward and an ``AcceleratedOptimizer`` (GradScaler under fp16), but no DDP
    wrapper, whose collectives would pair this model with another process's. No barrier on exit either, since
    processes may fit different numbers of models."""
    prepared_model = acc.prepare_model(model, evaluation_mode=True)
    prepared_opt = acc.prepare_optimizer(optimizer)
    try:
        yield Prepared(model=prepared_model, optimizer=prepared_opt, raw=model, max_steps=_MAX_STEPS)
    finally:
        acc.unwrap_model(prepared_model, keep_fp32_wrapper=False)
        acc.free_memory()


def optimizer_step(
    acc: Accelerator,
    p: Prepared,
    loss_fn: Callable[[nn.Module], torch.Tensor],
    *,
    clip_norm: float | None = None,
    step_scheduler: bool = True,
) -> torch.Tensor:
    """One (micro-)step: forward under autocast, ``acc.backward``, and, when the accumulation window closes,
    gradient clipping, the optimiser step, the scheduler step and ``zero_grad``. Returns the detached loss.
    The caller's loops stop once ``p.capped`` (``trainer.max_steps`` optimiser steps in this training).

    ``loss_fn(model)`` runs the forward on the prepared model; with ``trainer.grad_accum`` > 1 Accelerate skips
    the gradient all-reduce and the optimiser step until the last micro-step of the window.
    """
    with acc.accumulate(p.model):
        with acc.autocast():
            loss = loss_fn(p.model)
        acc.backward(loss)
        if clip_norm is not None and acc.sync_gradients:
            acc.clip_grad_norm_(p.model.parameters(), float(clip_norm))
        p.optimizer.step()
        if step_scheduler and p.scheduler is not None and acc.sync_gradients:
            p.scheduler.step()
        p.optimizer.zero_grad(set_to_none=True)
        if acc.sync_gradients:
            p.steps += 1
            if p.capped:
                log.warning(
                    "trainer.max_steps=%d reached: the rest of this training is skipped (a smoke run)", p.max_steps
                )
    return loss.detach()


def shard(acc: Accelerator, n: int) -> range:
    """This process's contiguous share of ``n`` items (the first processes take one more when it does not
    divide); a data-parallel sweep runs over it and :func:`gather_rows` puts the shares back in order."""
    world, rank = acc.num_processes, acc.process_index
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def gather_rows(acc: Accelerator, rows: np.ndarray, n: int) -> np.ndarray:
    """Every process's :func:`shard` of an ``[n, ...]`` array, concatenated in item order on every process."""
    if acc.num_processes == 1:
        return rows
    from accelerate.utils import gather_object

    parts: Sequence[np.ndarray] = gather_object([rows])
    out = np.concatenate(list(parts), axis=0)
    if len(out) != n:
        raise RuntimeError(f"gathered {len(out)} rows, expected {n}")
    return out


def per_process(acc: Accelerator, value: Any) -> list[Any]:
    """``value`` from every process, in rank order, on every process: what each one did (e.g. how many
    training samples it saw), for ``results.json`` to show that the work was shared."""
    if acc.num_processes == 1:
        return [value]
    from accelerate.utils import gather_object

    return list(gather_object([value]))
