"""The forgetting baselines of the GS-LoRA tables, on the same loop and data budget.

All are full fine-tunes of everything but the classifier head (the original's ``--one_stage``
"CL baselines" branch of ``train/train_own_forget_cl.py``). L2/EWC/MAS, LwF and DER(++)
forget by **random relabelling** of the forgotten images (``image_iter.py:CLDatasetWrapper``)
and add their own term: importance-weighted L2 to every earlier task-start model (L2, EWC,
MAS), an LwF distillation term, embedding distillation (DER) plus CE on a further remaining
batch (DER++). SCRUB alternates max-steps on forgotten data and min-steps on remaining data
against a frozen teacher; Retrain trains a fresh model on the remaining data only.

What one step sees follows the original's loaders: L2/EWC/MAS train on the relabelled forget
subset and the remaining subset mixed into one shuffled set (``--replay``'s ConcatDataset),
LwF/DER run their epochs over the forgotten subset with remaining batches cycled beside it
(``baselines/Lwftrain.py``, ``DERtrain.py``), Retrain over the remaining subset alone, SCRUB
as :meth:`SCRUB.plan` says (``baselines/SCRUBtrain.py``). Every forward passes the labels,
so the CosFace margin is in every logit the losses see, as there.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from genattr.engine.training import shard
from genattr.methods.forgetting.base import Batch, EpochPlan, ForgettingMethod, TaskData
from genattr.utils.errors import ConfigError

log = logging.getLogger(__name__)

RELABEL_MODES = ("original", "remaining")


class FullFineTune(ForgettingMethod):
    """Train everything but the head (``train_head``) on relabelled forgotten and remaining images.

    ``relabel: original`` reproduces ``CLDatasetWrapper``: y -> (y + U{1..n}) mod P, and
    (y + 1) mod P where that equals y, i.e. labels in the global ids [0, P) (whatever classes
    those are), redrawn every step; ``remaining`` draws a random remaining class instead (the
    evident intent). The draw is made on the global batch (:meth:`forget_labels`), before the processes
    take their rows of it.
    """

    epoch_over = "union"
    paired = False
    #: whether the forgotten images train with relabelled targets (SCRUB and Retrain do not relabel)
    relabels = True

    def __init__(self, *, relabel: str = "original", train_head: bool = False, **kw: Any) -> None:
        super().__init__(**kw)
        if relabel not in RELABEL_MODES:
            raise ConfigError(f"method.relabel={relabel} is unknown; choose one of {list(RELABEL_MODES)}")
        self.relabel_mode = relabel
        self.train_head = bool(train_head)
        self.remain_ids: torch.Tensor | None = None
        self.n_forget = 1
        self.n_classes = 1
        self.gen = torch.Generator()

    def begin_task(self, net: nn.Module, data: TaskData) -> nn.Module:
        for name, p in net.named_parameters():
            p.requires_grad_(self.train_head or not name.startswith("head."))
        self.remain_ids = torch.as_tensor(data.remain_classes, device=data.device)
        self.n_forget, self.n_classes = len(data.forget_classes), data.n_classes
        self.gen.manual_seed(7 + data.index)
        return net

    def relabel(self, yf: torch.Tensor) -> torch.Tensor:
        if self.relabel_mode == "original":
            shift = torch.randint(1, self.n_classes + 1, yf.shape, generator=self.gen).to(yf.device)
            new = (yf + shift) % self.n_forget
            return torch.where(new == yf, (yf + 1) % self.n_forget, new)
        assert self.remain_ids is not None
        pick = torch.randint(0, len(self.remain_ids), yf.shape, generator=self.gen).to(yf.device)
        return self.remain_ids[pick]

    def forget_labels(self, yf: torch.Tensor) -> torch.Tensor:
        return self.relabel(yf) if self.relabels else yf

    def relabel_ce(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """CE (margin logits) on [relabelled forgotten ; remaining]: one mixed batch of the union
        (``batch.yf`` already holds the :meth:`forget_labels` draw)."""
        x = torch.cat([batch.xf, batch.xr])
        y = torch.cat([batch.yf, batch.yr])
        logits, _ = model(x, y)
        return F.cross_entropy(logits, y)

    def regulariser(self, module: nn.Module) -> torch.Tensor:
        return next(module.parameters()).new_zeros(())

    def loss(
        self, model: nn.Module, module: nn.Module, batch: Batch, t: int, epoch: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        ce = self.relabel_ce(model, batch)
        reg = self.regulariser(module)
        total = ce + reg
        return total, {"ce": ce.item(), "reg": reg.item(), "loss": total.item()}

    def params(self) -> dict[str, Any]:
        return {"relabel": self.relabel_mode, "train_head": self.train_head}


IMPORTANCE_DATA = ("original", "budget")


class ImportanceL2(FullFineTune):
    """L2 / EWC / MAS: ``lam * sum_k sum imp_k * (theta - theta*_k)^2`` over every task so far.

    Term k is taken when task k starts: ``theta*_k`` = the task-start weights, ``imp_k`` from
    the remaining data of task k (ones for L2; EWC: squared gradients of the margin CE, each
    batch weighted by its size over the number of batches; MAS: |gradient| of the mean squared
    margin logits over the number of batches), in eval mode (``train_own_forget_cl.py``).
    ``online: true`` keeps only the newest term (the original's ``--online``).
    ``importance_data: original`` = task 0 a separate ``data_ratio`` draw of the remaining
    set, later tasks the whole remaining train split (the original's quirk: beyond the data
    budget); ``budget`` = the task's training subset.
    """

    KINDS = ("l2", "ewc", "mas")

    def __init__(
        self, *, kind: str, lam: float, online: bool = False, importance_data: str = "original", **kw: Any
    ) -> None:
        super().__init__(**kw)
        if kind not in self.KINDS:
            raise ConfigError(f"method.kind={kind} is unknown; choose one of {list(self.KINDS)}")
        if importance_data not in IMPORTANCE_DATA:
            raise ConfigError(
                f"method.importance_data={importance_data} is unknown; choose one of {list(IMPORTANCE_DATA)}"
            )
        self.kind, self.lam, self.online = kind, float(lam), bool(online)
        self.importance_data = importance_data
        # one (anchor, importance) per task; importance None = ones (L2)
        self.terms: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]] = []

    def importance_set(self, data: TaskData) -> Dataset:
        """The images the importance of task ``data.index`` is estimated on (``importance_data``)."""
        if self.importance_data == "budget":
            return data.remain
        if self.protocol is None:
            raise ConfigError(f"method={self.name} draws its importance data from the run's protocol; call run()")
        from genattr.data.forgetting import draw_task_subset

        p = self.protocol
        classes = [c for c in data.remain_classes if c not in set(p.missing)]
        labels = np.asarray(p.train.labels)
        if data.index == 0:
            sc = p.info["scenario"]
            rng = np.random.default_rng([int(sc["subset_seed"]), 0, 1])
            idx = draw_task_subset(
                labels,
                classes,
                data_ratio=sc["data_ratio"],
                few_shot=sc["few_shot"],
                ratio_over_split=bool(sc["ratio_over_split"]),
                rng=rng,
            )
        else:
            idx = np.flatnonzero(np.isin(labels, np.asarray(classes, dtype=np.int64)))
        return p.train.subset(idx)

    def estimate(self, net: nn.Module, params: dict[str, nn.Parameter], data: TaskData) -> dict[str, torch.Tensor]:
        """The importance sweep: per-batch gradients (``torch.autograd.grad``: nothing is trained), the
        batches shared out among the processes and their sums added up."""
        imp = {n: torch.zeros_like(p) for n, p in params.items()}
        was = net.training
        net.eval()
        gen = torch.Generator().manual_seed(self.run_seed * 7919 + data.index + 31)
        images = self.importance_set(data)
        workers = int(self.trainer["num_workers"])
        loader = DataLoader(images, batch_size=data.batch_size, shuffle=True, generator=gen, num_workers=workers)
        n_batches = max(len(loader), 1)
        acc = data.accelerator
        mine = range(len(loader)) if acc is None else shard(acc, len(loader))
        log.info(
            "%s: task %d importance from %d remaining images (method.importance_data=%s)",
            self.kind,
            data.index,
            len(images),  # type: ignore[arg-type]
            self.importance_data,
        )
        names = list(params)
        for b, (x, y) in enumerate(loader):  # every process walks the same shuffled batches and takes its own
            if b not in mine:
                continue
            x, y = x.to(data.device), y.to(data.device)
            logits, _ = net(x, y)
            obj = F.cross_entropy(logits, y) if self.kind == "ewc" else logits.pow(2).mean()
            grads = torch.autograd.grad(obj, [params[n] for n in names], allow_unused=True)
            for n, g in zip(names, grads, strict=True):
                if g is not None:
                    if self.kind == "ewc":
                        imp[n] += g.detach().pow(2) * len(x) / n_batches
                    else:
                        imp[n] += g.detach().abs() / n_batches
        if acc is not None and acc.num_processes > 1:
            imp = {n: acc.reduce(v, "sum") for n, v in imp.items()}
        net.train(was)
        return imp

    def begin_task(self, net: nn.Module, data: TaskData) -> nn.Module:
        net = super().begin_task(net, data)
        params = {n: p for n, p in net.named_parameters() if p.requires_grad}
        anchor = {n: p.detach().clone() for n, p in params.items()}
        imp = None if self.kind == "l2" else self.estimate(net, params, data)
        earlier = [] if self.online else [_on(a, data.device) for a in self.terms]  # restored terms are on the CPU
        self.terms = [*earlier, (anchor, imp)]
        log.info(
            "%s: %d regularisation term(s) at task %d (online=%s)", self.kind, len(self.terms), data.index, self.online
        )
        return net

    def regulariser(self, module: nn.Module) -> torch.Tensor:
        total = next(module.parameters()).new_zeros(())
        for anchor, imp in self.terms:
            for n, p in module.named_parameters():
                if n in anchor and p.requires_grad:
                    d = (p - anchor[n]).pow(2)
                    total = total + (d if imp is None else imp[n] * d).sum()
        return self.lam * total

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for k, (anchor, imp) in enumerate(self.terms):
            out.update({f"term{k}.anchor.{n}": v for n, v in anchor.items()})
            out.update({f"term{k}.importance.{n}": v for n, v in (imp or {}).items()})
        return out

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        n_terms = 1 + max((int(k.split(".", 1)[0][4:]) for k in tensors), default=-1)
        self.terms = []
        for k in range(n_terms):
            anchor = {key.split(".", 2)[2]: v for key, v in tensors.items() if key.startswith(f"term{k}.anchor.")}
            imp = {key.split(".", 2)[2]: v for key, v in tensors.items() if key.startswith(f"term{k}.importance.")}
            self.terms.append((anchor, imp or None))

    def params(self) -> dict[str, Any]:
        return {**super().params(), "online": self.online, "importance_data": self.importance_data}


def _on(
    term: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None], device: torch.device
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    anchor, imp = term
    return {n: v.to(device) for n, v in anchor.items()}, None if imp is None else {
        n: v.to(device) for n, v in imp.items()
    }


class _Teacher(FullFineTune):
    """A frozen copy of the task-start model (eval mode: no dropout)."""

    def begin_task(self, net: nn.Module, data: TaskData) -> nn.Module:
        self.teacher = copy.deepcopy(net).eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        return super().begin_task(net, data)

    def end_task(self, module: nn.Module, t: int) -> tuple[nn.Module, dict[str, Any]]:
        self.teacher = None
        return super().end_task(module, t)


def kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) at temperature T, summed over classes, batch mean, times T^2.

    ``util/sgda_utils.py:DistillKL`` (``kl_div(..., size_average=False) * T**2 / batch``).
    """
    t = temperature
    return F.kl_div(F.log_softmax(student / t, 1), F.softmax(teacher / t, 1), reduction="batchmean") * t * t


def lwf_kd_original(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``baselines/Lwftrain.py:L_old_kd_loss`` re-derived: softmax, power 1/T, log-softmax, then log.

    The last log is taken of a log-probability (<= 0), so every entry is NaN and the
    NaN-to-0 line zeroes it: the term is 0 with a zero gradient, whatever the logits.
    """
    p = F.softmax(student, -1).pow(1.0 / temperature)
    q = F.softmax(teacher, -1).pow(1.0 / temperature)
    log_p = torch.log(F.log_softmax(p, -1))
    log_p = torch.where(torch.isnan(log_p), torch.zeros_like(log_p), log_p)
    return torch.mean(torch.sum(-F.log_softmax(q, -1) * log_p, dim=1))


LWF_KD = ("original", "hinton")


class LwF(_Teacher):
    """CE on relabelled forgotten data + ``lam_remain`` CE + ``lam_kd`` KD to the teacher on remaining data.

    ``kd_loss: original`` is the original's term, identically 0 (:func:`lwf_kd_original`):
    LwF there trains on the two CE terms only; ``hinton`` = KL at temperature T instead.
    """

    epoch_over = "forget"
    paired = True

    def __init__(
        self,
        *,
        lam_remain: float = 10.0,
        lam_kd: float = 0.5,
        temperature: float = 2.0,
        kd_loss: str = "original",
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        if kd_loss not in LWF_KD:
            raise ConfigError(f"method.kd_loss={kd_loss} is unknown; choose one of {list(LWF_KD)}")
        self.lam_remain, self.lam_kd, self.temperature = float(lam_remain), float(lam_kd), float(temperature)
        self.kd_loss = kd_loss
        if kd_loss == "original":
            log.warning("LwF: kd_loss=original, the original's distillation term, which is always 0")

    def loss(
        self, model: nn.Module, module: nn.Module, batch: Batch, t: int, epoch: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        yf = batch.yf  # relabelled (forget_labels)
        logits_f, _ = model(batch.xf, yf)
        logits_r, _ = model(batch.xr, batch.yr)
        with torch.no_grad():
            teacher_r, _ = self.teacher(batch.xr, batch.yr)
        ce_f, ce_r = F.cross_entropy(logits_f, yf), F.cross_entropy(logits_r, batch.yr)
        term = lwf_kd_original if self.kd_loss == "original" else kd
        distil = term(logits_r, teacher_r, self.temperature)
        total = ce_f + self.lam_kd * distil + self.lam_remain * ce_r
        return total, {"ce_f": ce_f.item(), "ce_r": ce_r.item(), "kd": distil.item(), "loss": total.item()}

    def params(self) -> dict[str, Any]:
        return {**super().params(), "kd_loss": self.kd_loss}


class DERpp(_Teacher):
    """DER: CE on relabelled forgotten data + ``lam`` * squared distance of the remaining batch's
    embeddings to the teacher's (summed over the batch, ``DERtrain.py``); DER++ (``lam_plus`` > 0)
    adds ``lam_plus`` CE on the *next* remaining batch of the cycle. ``lam_plus: 0`` gives DER.
    """

    epoch_over = "forget"
    paired = True

    def __init__(self, *, lam: float = 0.005, lam_plus: float = 0.005, **kw: Any) -> None:
        super().__init__(**kw)
        self.lam, self.lam_plus = float(lam), float(lam_plus)

    def plan(self, lrs: Sequence[float], base_lr: float) -> list[EpochPlan]:
        extra = self.lam_plus != 0.0
        return [EpochPlan(lr=float(lr), over="forget", extra_remain=extra) for lr in lrs]

    def loss(
        self, model: nn.Module, module: nn.Module, batch: Batch, t: int, epoch: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        yf = batch.yf  # relabelled (forget_labels)
        logits_f, _ = model(batch.xf, yf)
        ce_f = F.cross_entropy(logits_f, yf)
        _, emb_r = model(batch.xr, batch.yr)
        with torch.no_grad():
            _, teacher_emb = self.teacher(batch.xr, batch.yr)
        der = (emb_r - teacher_emb).pow(2).sum()
        total = ce_f + self.lam * der
        parts = {"ce_f": ce_f.item(), "der": der.item()}
        if batch.extra is not None:
            x2, y2 = batch.extra
            logits2, _ = model(x2, y2)
            ce_next = F.cross_entropy(logits2, y2)
            total = total + self.lam_plus * ce_next
            parts["ce_next"] = ce_next.item()
        return total, {**parts, "loss": total.item()}


class SCRUB(_Teacher):
    """SCRUB (``baselines/SCRUBtrain.py``): max-steps ``-KL`` to the teacher on forgotten data,
    min-steps ``gamma * CE + alpha_kl * KL`` on remaining data, alternating in super-epochs.

    Each super-epoch has ``super_epoch`` remaining passes; the first ``msteps`` are each
    preceded by a pass of max-steps over the forgotten subset. ``trainer.epochs`` counts the
    remaining passes (100 = the original's 10 super-epochs of 10). Mid-task evaluations fall
    only in the passes without max-steps, as there. The LR is constant (Adam, no epoch
    scheduler) except the SGDA step decay: ``lr * lr_decay_rate`` once the original's epoch
    counter ``super * (msteps + super_epoch) + i`` exceeds ``lr_decay_epoch`` (100: from the
    8th super-epoch on). ``smoothing`` > 0 = SCRUB-S: ``smoothing * sum ||theta - theta_avg||_F``
    to an average of the model updated after every super-epoch (the first update copies the
    model, then ``(1 - swa_beta) avg + swa_beta theta``), kept across tasks.
    """

    epoch_over = "remain"  # and "forget" in its max-step passes (see plan)
    paired = False
    relabels = False

    def __init__(
        self,
        *,
        gamma: float = 0.99,
        alpha_kl: float = 0.001,
        msteps: int = 5,
        super_epoch: int = 10,
        temperature: float = 2.0,
        smoothing: float = 0.0,
        swa_beta: float = 0.1,
        lr_decay_epoch: int = 100,
        lr_decay_rate: float = 0.1,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.gamma, self.alpha_kl = float(gamma), float(alpha_kl)
        self.msteps, self.super_epoch = int(msteps), int(super_epoch)
        if not 0 <= self.msteps <= self.super_epoch or self.super_epoch < 1:
            raise ConfigError(f"method.msteps={msteps} must be in [0, method.super_epoch={super_epoch}]")
        self.temperature, self.smoothing, self.swa_beta = float(temperature), float(smoothing), float(swa_beta)
        self.lr_decay_epoch, self.lr_decay_rate = int(lr_decay_epoch), float(lr_decay_rate)
        self.swa: dict[str, torch.Tensor] | None = None
        self.n_averaged = 0
        self.super_ends: set[int] = set()

    def lr_at(self, base_lr: float, remain_pass: int) -> float:
        """``util/sgda_utils.py:adjust_learning_rate`` at the original's epoch counter."""
        s, i = divmod(remain_pass, self.super_epoch)
        counter = s * (self.msteps + self.super_epoch) + i
        return base_lr * self.lr_decay_rate ** int(counter > self.lr_decay_epoch)

    def plan(self, lrs: Sequence[float], base_lr: float) -> list[EpochPlan]:
        out: list[EpochPlan] = []
        self.super_ends = set()
        for e in range(len(lrs)):
            lr = self.lr_at(base_lr, e)
            i = e % self.super_epoch
            if i < self.msteps:
                out.append(EpochPlan(lr=lr, over="forget", paired=False, evaluate=False, phase="max"))
                out.append(EpochPlan(lr=lr, over="remain", paired=False, evaluate=False, phase="min"))
            else:
                out.append(EpochPlan(lr=lr, over="remain", paired=False, evaluate=True, phase="min"))
            if i == self.super_epoch - 1 or e == len(lrs) - 1:
                self.super_ends.add(len(out) - 1)
        return out

    def begin_task(self, net: nn.Module, data: TaskData) -> nn.Module:
        net = super().begin_task(net, data)
        if self.smoothing and self.swa is None:  # AveragedModel(BACKBONE) before the first task
            self.swa = {n: p.detach().clone() for n, p in net.named_parameters()}
        elif self.swa is not None:
            self.swa = {n: v.to(data.device) for n, v in self.swa.items()}
        return net

    def smooth(self, module: nn.Module) -> torch.Tensor:
        if not self.smoothing or self.swa is None:
            return next(module.parameters()).new_zeros(())
        dist = sum(torch.linalg.vector_norm(p - self.swa[n]) for n, p in module.named_parameters())
        return self.smoothing * dist

    def loss(
        self, model: nn.Module, module: nn.Module, batch: Batch, t: int, epoch: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if batch.phase == "max":
            logits_f, _ = model(batch.xf, batch.yf)
            with torch.no_grad():
                teacher_f, _ = self.teacher(batch.xf, batch.yf)
            kl_f = kd(logits_f, teacher_f, self.temperature)
            total = -kl_f + self.smooth(module)
            return total, {"kl_f": kl_f.item(), "loss_max": total.item()}
        logits_r, _ = model(batch.xr, batch.yr)
        with torch.no_grad():
            teacher_r, _ = self.teacher(batch.xr, batch.yr)
        ce = F.cross_entropy(logits_r, batch.yr)
        kl_r = kd(logits_r, teacher_r, self.temperature)
        total = self.gamma * ce + self.alpha_kl * kl_r + self.smooth(module)
        return total, {"ce_r": ce.item(), "kl_r": kl_r.item(), "loss": total.item()}

    @torch.no_grad()
    def end_epoch(self, module: nn.Module, t: int, k: int) -> None:
        if self.swa is None or k not in self.super_ends:
            return
        for n, p in module.named_parameters():
            if self.n_averaged == 0:
                self.swa[n].copy_(p)
            else:
                self.swa[n].mul_(1.0 - self.swa_beta).add_(p, alpha=self.swa_beta)
        self.n_averaged += 1

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.swa is None:
            return {}
        return {**{f"swa.{n}": v for n, v in self.swa.items()}, "n_averaged": torch.tensor(self.n_averaged)}

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if "n_averaged" in tensors:
            self.n_averaged = int(tensors["n_averaged"])
            self.swa = {k.removeprefix("swa."): v for k, v in tensors.items() if k.startswith("swa.")}


RETRAIN_INITS = ("auto", "scratch", "reset_ffn")


class Retrain(FullFineTune):
    """Train a fresh model on the remaining subset only (CE), every task; the head trains too.

    ``init: scratch`` = the model option's own random init (the original's face Retrain, a new
    ``ViT_face``); ``reset_ffn`` = the pre-trained network with every ``mlp.fc1/fc2`` re-drawn
    (the original's ImageNet Retrain: a new ``vit_b_16(IMAGENET1K_V1)`` whose FFN Linears
    ``replace_ffn_with_lora`` has swapped for fresh ones, the ``-r`` file not loaded);
    ``auto`` = ``reset_ffn`` for the ImageNet ViT (``build_imagenet_vit``), else ``scratch``.
    """

    epoch_over = "remain"
    paired = False
    relabels = False

    def __init__(self, *, init: str = "auto", **kw: Any) -> None:
        super().__init__(**kw)
        if init not in RETRAIN_INITS:
            raise ConfigError(f"method.init={init} is unknown; choose one of {list(RETRAIN_INITS)}")
        self.init = init
        self._pretrained: dict[str, torch.Tensor] | None = None

    def resolved_init(self) -> str:
        if self.init != "auto":
            return self.init
        return "reset_ffn" if str(self.model_cfg["_target_"]).endswith("build_imagenet_vit") else "scratch"

    def fresh(self, net: nn.Module, data: TaskData) -> nn.Module:
        from genattr.methods.forgetting.loop import initial_net
        from genattr.methods.forgetting.lora import ffn_targets
        from genattr.methods.forgetting.pretrain import build_net, effective_model_cfg

        mode = self.resolved_init()
        if self.protocol is None:
            raise ConfigError("method=retrain builds its fresh model from the run's protocol; call run()")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1_000 * (self.run_seed + 1) + data.index)
            if mode == "scratch":
                fresh = build_net(effective_model_cfg(self.model_cfg, self.protocol), self.protocol, weights=False)
            else:
                if self._pretrained is None:
                    src = initial_net(self.model_cfg, self.protocol, torch.device("cpu"))
                    self._pretrained = {k: v.detach().cpu().clone() for k, v in src.state_dict().items()}
                fresh = copy.deepcopy(net).cpu()
                fresh.load_state_dict(self._pretrained)
                layers = dict(fresh.named_modules())
                for name in ffn_targets(fresh):
                    layers[name].reset_parameters()
        log.info("retrain: task %d starts from a fresh model (init=%s)", data.index, mode)
        return fresh.to(data.device)

    def begin_task(self, net: nn.Module, data: TaskData) -> nn.Module:
        return super().begin_task(self.fresh(net, data), data)

    def loss(
        self, model: nn.Module, module: nn.Module, batch: Batch, t: int, epoch: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        logits, _ = model(batch.xr, batch.yr)
        ce = F.cross_entropy(logits, batch.yr)
        return ce, {"ce_r": ce.item(), "loss": ce.item()}

    def params(self) -> dict[str, Any]:
        return {**super().params(), "init": self.resolved_init()}
