"""peft LoRA on the FFN of every block, the group-lasso penalty over blocks, and the merge.

GS-LoRA groups the four LoRA matrices of one block (``fc1.lora_A/B``, ``fc2.lora_A/B``);
L_structure = sum over blocks of the L2 norm of the group (``engine_cl.py:get_structure_loss``).
The original uses loralib with ``lora_alpha=1``, i.e. scaling 1/r; peft's
``LoraConfig(r, lora_alpha=1)`` gives the same ``W + (1/r) B A`` with A ~ kaiming(a=sqrt 5), B = 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

ADAPTER = "default"


def ffn_targets(net: nn.Module) -> list[str]:
    """Full names of ``mlp.fc1`` and ``mlp.fc2`` of every block (the ``--lora_pos FFN`` default)."""
    name_of = {id(m): n for n, m in net.named_modules()}
    names = []
    for i, blk in enumerate(net.blocks):
        for leaf in ("fc1", "fc2"):
            layer = getattr(blk.mlp, leaf, None)
            if not isinstance(layer, nn.Linear):
                raise TypeError(f"block {i} has no Linear mlp.{leaf}; GS-LoRA targets timm Mlp blocks")
            names.append(name_of[id(layer)])
    return names


def attach_lora(net: nn.Module, lora: Mapping[str, Any], *, reinit_a_gain: float | None = None) -> PeftModel:
    """Wrap ``net`` with a fresh adapter on the FFN linears; everything else is frozen.

    ``lora`` holds ``LoraConfig`` fields (``method.lora``: r, lora_alpha, lora_dropout); a field it leaves
    out keeps peft's default. ``reinit_a_gain`` re-draws A with ``kaiming_uniform(a=gain)``: the original re-inits
    with a = sqrt(50) at the start of every task after the first (quirk, see the config).
    """
    cfg = LoraConfig(**dict(lora), bias="none", target_modules=ffn_targets(net))
    model = get_peft_model(net, cfg)
    if reinit_a_gain is not None:
        with torch.no_grad():
            for fc1, fc2 in block_lora_layers(model):
                for layer in (fc1, fc2):
                    nn.init.kaiming_uniform_(layer.lora_A[ADAPTER].weight, a=reinit_a_gain)
                    nn.init.zeros_(layer.lora_B[ADAPTER].weight)
    return model


def block_lora_layers(model: PeftModel) -> list[tuple[nn.Module, nn.Module]]:
    """The (fc1, fc2) peft LoRA layers of every block, in block order."""
    base = model.get_base_model()
    return [(blk.mlp.fc1, blk.mlp.fc2) for blk in base.blocks]


def group_tensors(model: PeftModel) -> list[list[torch.Tensor]]:
    """One group per block: [fc1.A, fc1.B, fc2.A, fc2.B]."""
    return [
        [layer.lora_A[ADAPTER].weight for layer in pair] + [layer.lora_B[ADAPTER].weight for layer in pair]
        for pair in block_lora_layers(model)
    ]


def structure_loss(groups: list[list[torch.Tensor]]) -> torch.Tensor:
    """Group lasso: sum_l sqrt(sum_{P in group l} ||P||_F^2)."""
    return torch.stack([torch.sqrt(sum((p**2).sum() for p in g)) for g in groups]).sum()


@torch.no_grad()
def group_norms(model: PeftModel) -> list[float]:
    """L2 norm of each block's LoRA parameters (``cal_norm.get_norm_of_lora``)."""
    return [float(math.sqrt(sum(float((p**2).sum()) for p in g))) for g in group_tensors(model)]


@torch.no_grad()
def delta_w_norms(model: PeftModel) -> list[float]:
    """||s * B A||_F summed in quadrature over fc1 and fc2: the weight change each block gets."""
    out = []
    for pair in block_lora_layers(model):
        sq = 0.0
        for layer in pair:
            delta = layer.scaling[ADAPTER] * layer.lora_B[ADAPTER].weight @ layer.lora_A[ADAPTER].weight
            sq += float((delta**2).sum())
        out.append(math.sqrt(sq))
    return out


def merge(model: PeftModel) -> nn.Module:
    """Fold the adapter into the base weights and drop the LoRA modules (end of a task)."""
    return model.merge_and_unload()


def lora_parameter_count(model: PeftModel) -> int:
    return sum(p.numel() for g in group_tensors(model) for p in g)
