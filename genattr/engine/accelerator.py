"""Build the Accelerator from ``trainer`` settings, with clear errors for impossible ones."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from genattr.engine.distributed import export_torch_distributed_env
from genattr.engine.training import set_max_steps
from genattr.utils.errors import ConfigError

PRECISIONS = ("no", "fp16", "bf16")


def make_accelerator(trainer: Mapping[str, Any]) -> Accelerator:
    """The run's Accelerator from ``trainer.{mixed_precision, cpu, grad_accum}`` (every trainer option has them);
    also sets the run's ``trainer.max_steps`` cap on every training (:func:`genattr.engine.training.set_max_steps`)."""
    export_torch_distributed_env()
    set_max_steps(trainer["max_steps"])
    mp = str(trainer["mixed_precision"])
    if mp not in PRECISIONS:
        raise ConfigError(f"trainer.mixed_precision={mp} is unknown; choose one of {list(PRECISIONS)}.")
    cpu = bool(trainer["cpu"]) or not torch.cuda.is_available()
    if mp == "fp16" and cpu:
        raise ConfigError(
            "trainer.mixed_precision=fp16 needs a CUDA GPU and none is in use; "
            "set trainer.mixed_precision=no (or bf16) to run on CPU."
        )
    # one process may run several runs (Hydra's basic multirun launcher, a notebook, the tests): Accelerate keeps
    # the first run's precision in a process-wide singleton and refuses another one, so each run starts from a
    # clean AcceleratorState; the distributed PartialState (the process group) is kept
    AcceleratorState._reset_state()
    return Accelerator(cpu=cpu, mixed_precision=mp, gradient_accumulation_steps=int(trainer["grad_accum"]))
