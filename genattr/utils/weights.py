"""Weights as files hold them: contiguous CPU tensors, whatever device a module trains on."""

from __future__ import annotations

import torch
from torch import nn


def state_dict_cpu(module: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies of a module's state, ready for safetensors (which refuses views and GPU tensors)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
