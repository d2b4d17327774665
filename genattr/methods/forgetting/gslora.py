"""GS-LoRA and GS-LoRA++: forget classes with a fresh, group-sparse peft LoRA per task.

Loss of one step (``engine_cl.py:train_one_epoch``)::

    L = CE(f(x_r), y_r) + beta_t * ReLU(BND - CE(f(x_f), y_f)) + alpha * sum_l ||group_l||_2 + L_pro

with CosFace margin logits, LoRA (r 8, scaling 1/r) on the two FFN linears of every block
and everything else frozen, head included. At task end the adapter is merged into the
weights and the next task starts a fresh one. GS-LoRA++ adds
``L_pro = w_f * ReLU(BND_pro - KL(softmax(p_y) || softmax(emb(x_f)))) + w_r * KL(.. x_r ..)`` with
class prototypes ``p`` = mean embeddings of the task-start model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from genattr.methods.forgetting.base import Batch, ForgettingMethod, TaskData, bounded_forget_loss, per_task
from genattr.methods.forgetting.lora import (
    attach_lora,
    delta_w_norms,
    group_norms,
    group_tensors,
    lora_parameter_count,
    merge,
    structure_loss,
)
from genattr.utils.errors import ConfigError

log = logging.getLogger(__name__)


@torch.no_grad()
def class_prototypes(net: nn.Module, data: TaskData) -> torch.Tensor:
    """Mean embedding per class over the task's forget + remain training subsets (eval mode)."""
    was = net.training
    net.eval()
    sums: torch.Tensor | None = None
    counts = torch.zeros(data.n_classes, device=data.device)
    for ds in (data.forget, data.remain):
        for x, y in DataLoader(ds, batch_size=256):
            x, y = x.to(data.device), y.to(data.device)
            _, emb = net(x, None)
            if sums is None:
                sums = torch.zeros(data.n_classes, emb.shape[1], device=data.device)
            sums.index_add_(0, y, emb)
            counts.index_add_(0, y, torch.ones_like(y, dtype=counts.dtype))
    net.train(was)
    assert sums is not None
    return sums / counts.clamp(min=1)[:, None]


def prototype_distance(emb: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """KL(softmax(prototype) || softmax(embedding)), batch mean (``get_prototype_loss``)."""
    return F.kl_div(F.log_softmax(emb, 1), F.log_softmax(protos, 1), log_target=True, reduction="batchmean")


class GSLoRA(ForgettingMethod):
    """GS-LoRA (``prototype.enabled=false``) and GS-LoRA++ (``true``); ``alpha=0`` is the plain-LoRA ablation."""

    def __init__(
        self,
        *,
        lora: Mapping[str, Any],
        alpha: float,
        warmup_alpha: Mapping[str, Any],
        prototype: Mapping[str, Any],
        reinit_a_sqrt50: bool,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.lora = dict(lora)
        self.alpha = float(alpha)
        self.warmup = dict(warmup_alpha)
        self.proto_cfg = dict(prototype)
        self.reinit_a_sqrt50 = bool(reinit_a_sqrt50)
        if int(self.lora["r"]) < 1:
            raise ConfigError(f"method.lora.r={self.lora['r']} must be >= 1")
        self.protos: torch.Tensor | None = None
        self._lora_params = 0
        log.info(
            "GS-LoRA quirks: reinit_a_sqrt50=%s (A re-drawn with kaiming a=sqrt(50) after task 0), "
            "eval_margin=%s, sparsity warm-up=%s, prototypes=%s",
            self.reinit_a_sqrt50,
            self.eval_margin,
            self.warmup,
            self.proto_cfg,
        )

    def alpha_at(self, epoch: int) -> float:
        """Sparsity warm-up: alpha = 0 for the first ``epochs`` epochs, then ``alpha`` of the warm-up."""
        if self.warmup["enabled"]:
            return 0.0 if epoch < int(self.warmup["epochs"]) else float(self.warmup["alpha"])
        return self.alpha

    def begin_task(self, net: nn.Module, data: TaskData) -> nn.Module:
        if self.proto_cfg["enabled"]:
            self.protos = class_prototypes(net, data)
        gain = math.sqrt(50.0) if (self.reinit_a_sqrt50 and data.index > 0) else None
        model = attach_lora(net, self.lora, reinit_a_gain=gain)
        self._lora_params = lora_parameter_count(model)
        return model

    def loss(
        self, model: nn.Module, module: nn.Module, batch: Batch, t: int, epoch: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        logits_r, emb_r = model(batch.xr, batch.yr)
        logits_f, emb_f = model(batch.xf, batch.yf)
        ce_r = F.cross_entropy(logits_r, batch.yr)
        forget = bounded_forget_loss(logits_f, batch.yf, self.bnd)
        alpha = self.alpha_at(epoch)
        struct = structure_loss(group_tensors(module))  # the peft model's own LoRA factors
        total = ce_r + per_task(self.beta, t) * forget + alpha * struct
        parts = {"ce_r": ce_r.item(), "forget": forget.item(), "structure": struct.item()}
        if self.protos is not None:
            d_f = prototype_distance(emb_f, self.protos[batch.yf])
            pro = per_task(self.proto_cfg["weight"], t) * F.relu(float(self.proto_cfg["bnd"]) - d_f)
            r_weight = float(self.proto_cfg["r_weight"])
            if r_weight:
                pro = pro + r_weight * prototype_distance(emb_r, self.protos[batch.yr])
            total = total + pro
            parts["prototype"] = pro.item()
        parts["loss"] = total.item()
        return total, parts

    def end_task(self, module: nn.Module, t: int) -> tuple[nn.Module, dict[str, Any]]:
        stats = {"group_norms": group_norms(module), "delta_w_norms": delta_w_norms(module)}
        self.protos = None
        return merge(module), stats

    def params(self) -> dict[str, Any]:
        return {"lora_params_per_task": self._lora_params, "alpha": self.alpha}
