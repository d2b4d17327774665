"""The forgetting baselines of the GS-LoRA tables, on the same loop and data budget.

All but Retrain are full fine-tunes with the classifier head frozen (the original's
``--one_stage`` "CL baselines" branch) that forget by **random relabelling** of the
forgotten images plus replay of the remaining subset (``specs/gslora.md`` 4.6), then add
their own term: importance-weighted L2 to the task-start weights (L2, EWC, MAS), logit
distillation (LwF), embedding distillation (DER++), or teacher KL (SCRUB).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from genattr.methods.forgetting.base import Batch, ForgettingMethod, TaskData
from genattr.utils.errors import ConfigError

log = logging.getLogger(__name__)

RELABEL_MODES = ("original", "remaining")


class FullFineTune(ForgettingMethod):
    """Relabel the forgotten images, replay the remaining ones, train all but the head.

    ``relabel: original`` reproduces ``CLDatasetWrapper``: y -> (y + U{1..n}) mod P, i.e.
    labels in the global ids [0, P) (whatever classes those are), redrawn every step;
    ``remaining`` draws a random remaining class instead (the evident intent).
    """

    def __init__(self, *, relabel: str = "original", **kw: Any) -> None:
        super().__init__(**kw)
        if relabel not in RELABEL_MODES:
            raise ConfigError(f"method.relabel={relabel} is unknown; choose one of {list(RELABEL_MODES)}")
        self.relabel_mode = relabel
        self.remain_ids: torch.Tensor | None = None
        self.n_forget = 1
        self.n_classes = 1
        self.anchor: dict[str, torch.Tensor] = {}
        self.gen = torch.Generator()

    def begin_task(self, net: nn.Module, data: TaskData) -> nn.Module:
        for name, p in net.named_parameters():
            p.requires_grad_(not name.startswith("head."))
        self.remain_ids = torch.as_tensor(data.remain_classes, device=data.device)
        self.n_forget, self.n_classes = len(data.forget_classes), data.n_classes
        self.gen.manual_seed(7 + data.index)
        self.anchor = {n: p.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
        return net

    def relabel(self, yf: torch.Tensor) -> torch.Tensor:
        if self.relabel_mode == "original":
            shift = torch.randint(1, self.n_classes + 1, yf.shape, generator=self.gen).to(yf.device)
            return (yf + shift) % self.n_forget
        assert self.remain_ids is not None
        pick = torch.randint(0, len(self.remain_ids), yf.shape, generator=self.gen).to(yf.device)
        return self.remain_ids[pick]

    def relabel_ce(self, module: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CE on [relabelled forgotten ; remaining] and the (margin-free) logits / embeddings of both halves."""
        x = torch.cat([batch.xf, batch.xr])
        y = torch.cat([self.relabel(batch.yf), batch.yr])
        logits, emb = module(x, y)
        return F.cross_entropy(logits, y), logits, emb

    def regulariser(self, module: nn.Module, batch: Batch, logits: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return logits.new_zeros(())

    def loss(self, module: nn.Module, batch: Batch, t: int, epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        ce, logits, emb = self.relabel_ce(module, batch)
        reg = self.regulariser(module, batch, logits, emb)
        total = ce + reg
        return total, {"ce": ce.item(), "reg": reg.item(), "loss": total.item()}

    def end_task(self, module: nn.Module, t: int) -> tuple[nn.Module, dict[str, Any]]:
        self.anchor = {}
        return module, {}


class ImportanceL2(FullFineTune):
    """L2 / EWC / MAS: ``lam * sum imp * (theta - theta*)^2`` with importance from the remaining subset."""

    KINDS = ("l2", "ewc", "mas")

    def __init__(self, *, kind: str, lam: float, **kw: Any) -> None:
        super().__init__(**kw)
        if kind not in self.KINDS:
            raise ConfigError(f"method.kind={kind} is unknown; choose one of {list(self.KINDS)}")
        self.kind, self.lam = kind, float(lam)
        self.importance: dict[str, torch.Tensor] = {}

    def begin_task(self, net: nn.Module, data: TaskData) -> nn.Module:
        net = super().begin_task(net, data)
        params = {n: p for n, p in net.named_parameters() if p.requires_grad}
        if self.kind == "l2":
            self.importance = {n: torch.ones_like(p) for n, p in params.items()}
            return net
        imp = {n: torch.zeros_like(p) for n, p in params.items()}
        batches = 0
        was = net.training
        net.eval()
        for x, y in DataLoader(data.remain, batch_size=data.batch_size):
            x, y = x.to(data.device), y.to(data.device)
            net.zero_grad(set_to_none=True)
            logits, _ = net(x, y if self.kind == "ewc" else None)
            obj = F.cross_entropy(logits, y) if self.kind == "ewc" else logits.pow(2).mean()
            obj.backward()
            for n, p in params.items():
                if p.grad is not None:
                    imp[n] += p.grad.detach().pow(2) if self.kind == "ewc" else p.grad.detach().abs()
            batches += 1
        net.zero_grad(set_to_none=True)
        net.train(was)
        self.importance = {n: v / max(batches, 1) for n, v in imp.items()}
        return net

    def regulariser(self, module: nn.Module, batch: Batch, logits: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        total = logits.new_zeros(())
        for n, p in module.named_parameters():
            if n in self.importance:
                total = total + (self.importance[n] * (p - self.anchor[n]).pow(2)).sum()
        return self.lam * total


class _Teacher(FullFineTune):
    """A frozen copy of the task-start model."""

    def begin_task(self, net: nn.Module, data: TaskData) -> nn.Module:
        self.teacher = copy.deepcopy(net).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        return super().begin_task(net, data)

    def end_task(self, module: nn.Module, t: int) -> tuple[nn.Module, dict[str, Any]]:
        self.teacher = None
        return super().end_task(module, t)


def kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) at temperature T, scaled by T^2 (Hinton)."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, 1), F.softmax(teacher / t, 1), reduction="batchmean") * t * t


class LwF(_Teacher):
    """Relabel CE on forgotten + ``lam_remain`` CE and ``lam_kd`` KD (T) on remaining data."""

    def __init__(self, *, lam_remain: float = 10.0, lam_kd: float = 0.5, temperature: float = 2.0, **kw: Any) -> None:
        super().__init__(**kw)
        self.lam_remain, self.lam_kd, self.temperature = float(lam_remain), float(lam_kd), float(temperature)

    def loss(self, module: nn.Module, batch: Batch, t: int, epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        yf = self.relabel(batch.yf)
        logits_f, _ = module(batch.xf, yf)
        logits_r, _ = module(batch.xr, batch.yr)
        plain_r, _ = module(batch.xr, None)
        with torch.no_grad():
            teacher_r, _ = self.teacher(batch.xr, None)
        ce_f, ce_r = F.cross_entropy(logits_f, yf), F.cross_entropy(logits_r, batch.yr)
        distil = kd(plain_r, teacher_r, self.temperature)
        total = ce_f + self.lam_remain * ce_r + self.lam_kd * distil
        return total, {"ce_f": ce_f.item(), "ce_r": ce_r.item(), "kd": distil.item(), "loss": total.item()}


class DERpp(_Teacher):
    """DER (``lam``: squared L2 to the teacher's embeddings on remaining data); DER++ adds ``lam_plus`` CE.

    The extra CE of DER++ is on the remaining batch rolled by one sample (the original draws
    another remaining batch; the rolled batch pairs each logit with another label order).
    """

    def __init__(self, *, lam: float = 0.005, lam_plus: float = 0.005, **kw: Any) -> None:
        super().__init__(**kw)
        self.lam, self.lam_plus = float(lam), float(lam_plus)

    def regulariser(self, module: nn.Module, batch: Batch, logits: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        emb_r = emb[len(batch.xf) :]
        with torch.no_grad():
            _, teacher_emb = self.teacher(batch.xr, None)
        reg = self.lam * (emb_r - teacher_emb).pow(2).sum(1).mean()
        if self.lam_plus:
            xr2, yr2 = batch.xr.roll(1, 0), batch.yr.roll(1, 0)
            logits2, _ = module(xr2, yr2)
            reg = reg + self.lam_plus * F.cross_entropy(logits2, yr2)
        return reg


class SCRUB(_Teacher):
    """SCRUB: max-step ``-KL(teacher || student)`` on forgotten data for the first ``msteps`` epochs,
    min-step ``gamma * CE + alpha_kl * KL`` on remaining data; ``smoothing`` > 0 adds SCRUB-S's
    parameter-distance term. Both steps are summed into one update here (the original alternates
    two optimiser steps).
    """

    def __init__(
        self,
        *,
        gamma: float = 1.0,
        alpha_kl: float = 1.0,
        msteps: int = 3,
        temperature: float = 4.0,
        smoothing: float = 0.0,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.gamma, self.alpha_kl, self.msteps = float(gamma), float(alpha_kl), int(msteps)
        self.temperature, self.smoothing = float(temperature), float(smoothing)

    def loss(self, module: nn.Module, batch: Batch, t: int, epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        logits_r, _ = module(batch.xr, batch.yr)
        plain_r, _ = module(batch.xr, None)
        with torch.no_grad():
            teacher_r, _ = self.teacher(batch.xr, None)
            teacher_f, _ = self.teacher(batch.xf, None)
        ce = F.cross_entropy(logits_r, batch.yr)
        total = self.gamma * ce + self.alpha_kl * kd(plain_r, teacher_r, self.temperature)
        max_term = logits_r.new_zeros(())
        if epoch < self.msteps:
            plain_f, _ = module(batch.xf, None)
            max_term = kd(plain_f, teacher_f, self.temperature)
            total = total - max_term
        if self.smoothing:
            dist = sum((p - self.anchor[n]).pow(2).sum() for n, p in module.named_parameters() if n in self.anchor)
            total = total + self.smoothing * dist
        return total, {"ce_r": ce.item(), "kl_f": max_term.item(), "loss": total.item()}


def reinitialise(net: nn.Module, seed: int) -> nn.Module:
    """A freshly initialised copy of ``net`` (same architecture, new random weights)."""
    torch.manual_seed(seed)
    fresh = copy.deepcopy(net)
    for m in fresh.modules():
        if m is not fresh and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    for name, p in fresh.named_parameters():
        if name.endswith(("pos_embed", "cls_token")):
            nn.init.trunc_normal_(p, std=0.02)
        elif name == "head.weight" and p.ndim == 2:
            nn.init.xavier_uniform_(p)
    return fresh


class Retrain(FullFineTune):
    """Retrain from scratch on the remaining subset only (CE), head frozen at its fresh init."""

    def begin_task(self, net: nn.Module, data: TaskData) -> nn.Module:
        fresh = reinitialise(net, seed=1_000 + data.index)
        return super().begin_task(fresh, data)

    def loss(self, module: nn.Module, batch: Batch, t: int, epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        logits, _ = module(batch.xr, batch.yr)
        ce = F.cross_entropy(logits, batch.yr)
        return ce, {"ce_r": ce.item(), "loss": ce.item()}
