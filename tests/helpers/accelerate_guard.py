"""A guard that fails a run which trains outside Accelerate, and records the dtypes its layers compute in.

Inside :func:`accelerate_guard`:

* ``loss.backward()`` outside ``Accelerator.backward`` fails (gradients that bypass the GradScaler under fp16 and
  the DDP all-reduce on several processes);
* ``Accelerator.backward`` with no prepared model or optimizer fails (the forgetting loop once did exactly this);
* an optimiser step that is not an ``AcceleratedOptimizer`` step fails (an unprepared optimizer);
* every Linear / Conv output while a module trains with gradients on is recorded as ``guard.train_dtypes``, so a
  test can check that ``trainer.mixed_precision=bf16`` really makes the training forward run in bf16.

Gradients taken with ``torch.autograd.grad`` or ``torch.func`` (AbU's Fisher and query gradients, which update
no optimiser) are not backward passes and stay allowed. The checks hold while the engine runs a family's stages
(``StagedFamily.run_stage``): building a synthetic twin (its generators, its pretrained backbone) is not the
method's training, and depending on the cache it happens or not before the first stage.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook


@dataclass
class Guard:
    train_dtypes: list[torch.dtype] = field(default_factory=list)
    backwards: int = 0
    steps: int = 0
    stages: int = 0
    _in_backward: bool = False
    _in_step: bool = False
    _in_stage: bool = False


@contextmanager
def accelerate_guard(*, everywhere: bool = False) -> Iterator[Guard]:
    """Check every backward / step / forward inside the block (``everywhere``), or only inside the engine's
    stages (the default, see the module docstring)."""
    from genattr.engine import stages as stages_mod

    guard = Guard(_in_stage=everywhere)
    tensor_backward = torch.Tensor.backward
    acc_backward = Accelerator.backward
    acc_step = AcceleratedOptimizer.step

    def checked_tensor_backward(self, *args, **kwargs):
        if guard._in_stage and not guard._in_backward:
            raise AssertionError("loss.backward() outside Accelerator.backward: this loop bypasses Accelerate")
        return tensor_backward(self, *args, **kwargs)

    def checked_acc_backward(self, loss, **kwargs):
        if guard._in_stage and (not self._optimizers or not self._models):
            raise AssertionError("Accelerator.backward with no prepared model / optimizer (acc.prepare was skipped)")
        guard._in_backward, guard.backwards = True, guard.backwards + 1
        try:
            return acc_backward(self, loss, **kwargs)
        finally:
            guard._in_backward = False

    def checked_acc_step(self, *args, **kwargs):
        guard._in_step = True
        try:
            return acc_step(self, *args, **kwargs)
        finally:
            guard._in_step = False

    def step_pre_hook(optimizer, args, kwargs):
        if guard._in_stage and not guard._in_step:
            raise AssertionError(f"{type(optimizer).__name__}.step() on an optimizer Accelerate never prepared")
        guard.steps += 1

    def forward_hook(module, args, output):
        if not guard._in_stage:
            return
        if isinstance(module, nn.Linear | nn.Conv2d) and module.training and torch.is_grad_enabled():
            if isinstance(output, torch.Tensor):
                guard.train_dtypes.append(output.dtype)

    staged_init = stages_mod.StagedRun.__init__

    def guarded_init(self, family, *args, **kwargs):
        run_stage = family.run_stage

        def guarded_stage(k):
            before, guard._in_stage = guard._in_stage, True
            guard.stages += 1
            try:
                return run_stage(k)
            finally:
                guard._in_stage = before

        family.run_stage = guarded_stage
        staged_init(self, family, *args, **kwargs)

    stages_mod.StagedRun.__init__ = guarded_init
    torch.Tensor.backward = checked_tensor_backward
    Accelerator.backward = checked_acc_backward
    AcceleratedOptimizer.step = checked_acc_step
    step_handle = register_optimizer_step_pre_hook(step_pre_hook)
    fwd_handle = nn.modules.module.register_module_forward_hook(forward_hook)
    try:
        yield guard
    finally:
        stages_mod.StagedRun.__init__ = staged_init
        torch.Tensor.backward = tensor_backward
        Accelerator.backward = acc_backward
        AcceleratedOptimizer.step = acc_step
        step_handle.remove()
        fwd_handle.remove()
