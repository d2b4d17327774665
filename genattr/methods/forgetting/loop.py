"""The task loop shared by GS-LoRA and the forgetting baselines.

Per task: evaluate the task-start model, let the method wrap the network, train on
paired batches (an epoch runs over the remaining subset; the forgotten subset is cycled
beside it, as ``engine_cl.py``), let the method finish the task (merge), evaluate, log,
checkpoint. The checkpoint holds the merged network, the per-task table and the RNG
state, so a resumed run continues at the next task with the same results.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from genattr.data.forgetting import ForgettingProtocol
from genattr.engine.schedule import epoch_lr, set_lr
from genattr.methods.base import Report, RunContext
from genattr.methods.forgetting.base import Batch, ForgettingMethod, TaskData
from genattr.methods.forgetting.pretrain import (
    build_net,
    decode_all,
    effective_model_cfg,
    state_dict_cpu,
    twin_backbone,
)
from genattr.metrics.forgetting import h_mean, pooled_accuracy, zero_group_ratio
from genattr.utils.errors import ConfigError
from genattr.utils.seed import rng_state, set_rng_state

log = logging.getLogger(__name__)


def param_groups(named: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    """timm's ``create_optimizer`` rule: 2-D weights (LoRA included) decay, biases and norms do not."""
    decay = [p for n, p in named if p.ndim > 1 and not n.endswith(".bias")]
    rest = [p for n, p in named if not (p.ndim > 1 and not n.endswith(".bias"))]
    return [
        g
        for g in ({"params": rest, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay})
        if g["params"]
    ]


class _Split:
    """Selects the images of a class set, from disk or from tensors decoded once (``trainer.preload``)."""

    def __init__(self, ds: Any, preload: bool) -> None:
        self.ds = ds
        self.labels = np.asarray(ds.labels)
        self.tensors = decode_all(ds).tensors if preload else None

    def select(self, classes: tuple[int, ...] | list[int]) -> Dataset:
        idx = np.flatnonzero(np.isin(self.labels, np.asarray(classes, dtype=np.int64)))
        if self.tensors is None:
            return self.ds.subset(idx)
        t = torch.as_tensor(idx)
        return TensorDataset(self.tensors[0][t], self.tensors[1][t])

    def all(self) -> Dataset:
        return self.ds if self.tensors is None else TensorDataset(*self.tensors)


class ForgettingLoop:
    def __init__(self, method: ForgettingMethod, protocol: ForgettingProtocol, ctx: RunContext) -> None:
        if getattr(protocol, "kind", None) != "forgetting":
            raise ConfigError(f"method={method.name} needs a forgetting protocol, got {type(protocol).__name__}")
        self.method, self.protocol, self.ctx = method, protocol, ctx
        self.acc = ctx.accelerator
        self.tr = method.trainer
        preload = bool(self.tr.get("preload", False))
        self.train = _Split(protocol.train.subset(protocol.train_subset), preload)
        self.test = _Split(protocol.test, preload)
        self.rows: list[dict[str, Any]] = []
        self.pre_correct: np.ndarray | None = None
        self.pre_total: np.ndarray | None = None

    # -- network ------------------------------------------------------------------------------
    def _initial_net(self) -> nn.Module:
        cfg = effective_model_cfg(self.method.model_cfg, self.protocol)
        has_weights = cfg.get("weights") is not None or bool(cfg.get("pretrained", False))
        if has_weights:
            return build_net(cfg, self.protocol).to(self.acc.device)
        if self.protocol.source == "twin" and (cfg.get("twin_pretrain") or {}).get("enabled", False):
            return twin_backbone(cfg, self.protocol, self.acc.device)
        raise ConfigError(
            "forgetting starts from a pre-trained backbone: set model.weights=<file> (make one with "
            "method=pretrain) or, for the ImageNet ViT, model.pretrained=true"
        )

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, net: nn.Module) -> tuple[np.ndarray, np.ndarray]:
        """Per-class correct / total counts over the whole test split (one pass)."""
        n = self.protocol.n_classes
        correct, total = np.zeros(n), np.zeros(n)
        was = net.training
        net.eval()
        loader = DataLoader(self.test.all(), batch_size=int(self.tr.get("eval_batch_size", 256)), shuffle=False)
        for x, y in loader:
            x, y = x.to(self.acc.device), y.to(self.acc.device)
            logits, _ = net(x, y if self.method.eval_margin else None)
            hit = (logits.argmax(1) == y).cpu().numpy()
            yc = y.cpu().numpy()
            np.add.at(correct, yc, hit)
            np.add.at(total, yc, 1)
        net.train(was)
        return correct, total

    # -- training -----------------------------------------------------------------------------
    def _loader(self, ds: Dataset, seed: int) -> DataLoader:
        bs = int(self.tr["batch_size"])
        gen = torch.Generator().manual_seed(seed)
        return DataLoader(
            ds,
            batch_size=bs,
            shuffle=True,
            drop_last=len(ds) > bs,
            num_workers=int(self.tr.get("num_workers", 0)),
            generator=gen,
        )

    def _cycle(self, ds: Dataset, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        k = 0
        while True:
            yield from self._loader(ds, seed + 1000 * k)
            k += 1

    def train_task(self, module: nn.Module, t: int, remain: Dataset, forget: Dataset) -> dict[str, float]:
        method, tr = self.method, self.tr
        opt_cfg, sch = tr["optimizer"], tr["schedule"]
        named = method.trainable(module)
        if not named:
            raise ConfigError(f"method={method.name} left no trainable parameter")
        base = method.lr if method.lr is not None else float(opt_cfg["lr"])
        groups = param_groups(named, float(opt_cfg.get("weight_decay", 0.05)))
        if method.optimizer == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam([p for _, p in named], lr=base)
        else:
            opt = torch.optim.AdamW(groups, lr=base, betas=tuple(opt_cfg.get("betas", (0.9, 0.999))))
        epochs = int(tr["epochs"])
        seed = self.ctx.seed * 7919 + t
        forget_iter = self._cycle(forget, seed + 17)
        dev = self.acc.device
        parts_sum: dict[str, float] = {}
        steps = 0
        for epoch in range(epochs):
            lr = epoch_lr(
                epoch,
                base_lr=base,
                epochs=epochs,
                warmup_epochs=int(sch.get("warmup_epochs", 0)),
                warmup_lr=float(sch.get("warmup_lr", 1e-6)),
                min_lr=float(sch.get("min_lr", 1e-5)),
                step_after_epoch=bool(sch.get("step_after_epoch", True)),
            )
            set_lr(opt, lr)
            module.train()
            parts_sum, steps = {}, 0
            for xr, yr in self._loader(remain, seed + epoch):
                xf, yf = next(forget_iter)
                batch = Batch(xr.to(dev), yr.to(dev), xf.to(dev), yf.to(dev))
                loss, parts = method.loss(module, batch, t, epoch)
                opt.zero_grad(set_to_none=True)
                self.acc.backward(loss)
                opt.step()
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + v
                steps += 1
            means = {f"train/{k}": v / max(steps, 1) for k, v in parts_sum.items()}
            self.ctx.tracker.log_metrics({**means, "train/lr": lr}, step=t * epochs + epoch)
            log.debug("task %d epoch %d/%d: %s", t, epoch + 1, epochs, means)
        return {k: v / max(steps, 1) for k, v in parts_sum.items()}

    # -- checkpoints ----------------------------------------------------------------------------
    def _save(self, net: nn.Module, t: int) -> None:
        meta, tensors = rng_state()

        def write(folder: Path) -> None:
            save_file(state_dict_cpu(net), str(folder / "model.safetensors"))
            save_file(tensors, str(folder / "rng.safetensors"))

        state = {
            "task": t,
            "task_names": self.protocol.task_names,
            "rows": self.rows,
            "pretrain_correct": self.pre_correct.tolist(),
            "pretrain_total": self.pre_total.tolist(),
            "rng": meta,
            "mlflow_run_id": getattr(self.ctx.tracker, "run_id", None),
            "config_fingerprint": self.ctx.config_fingerprint,
        }
        if self.acc.is_main_process:
            self.ctx.checkpoints.save(t, write, state)
        self.acc.wait_for_everyone()

    def _restore(self, net: nn.Module) -> int:
        found = self.ctx.checkpoints.latest_for(self.ctx.config_fingerprint, self.protocol.task_names)
        if found is None:
            return 0
        folder, state = found
        net.load_state_dict(load_file(str(folder / "model.safetensors")))
        self.rows = list(state["rows"])
        self.pre_correct = np.asarray(state["pretrain_correct"])
        self.pre_total = np.asarray(state["pretrain_total"])
        set_rng_state(state["rng"], load_file(str(folder / "rng.safetensors")))
        log.warning("resumed from %s: continuing at task %d", folder, int(state["task"]) + 1)
        return int(state["task"]) + 1

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> Report:
        method, protocol = self.method, self.protocol
        net = self._initial_net()
        start = self._restore(net)
        if start == 0:
            self.pre_correct, self.pre_total = self.evaluate(net)
        total_params = sum(p.numel() for p in net.parameters())
        n = len(protocol.tasks)
        t0 = time.perf_counter()
        for t in range(start, n):
            task = protocol.tasks[t]
            ts = time.perf_counter()
            c0, n0 = self.evaluate(net)
            remain, forget = self.train.select(task.remain), self.train.select(task.forget)
            if len(forget) == 0 or len(remain) == 0:
                raise ConfigError(f"task {task.name} has no training image to forget or to keep; raise the data budget")
            data = TaskData(
                index=t,
                forget_classes=task.forget,
                remain_classes=task.remain,
                remain=remain,
                forget=forget,
                device=self.acc.device,
                batch_size=int(self.tr["batch_size"]),
                n_classes=protocol.n_classes,
                eval_margin=method.eval_margin,
            )
            module = method.begin_task(net, data)
            trainable = sum(p.numel() for _, p in method.trainable(module))
            train_parts = self.train_task(module, t, remain, forget)
            net, stats = method.end_task(module, t)
            c1, n1 = self.evaluate(net)
            row = self._row(t, (c0, n0), (c1, n1), stats, train_parts, trainable, total_params)
            row["seconds"] = time.perf_counter() - ts
            self.rows.append(row)
            self.ctx.tracker.log_metrics(
                {f"task/{k}": float(v) for k, v in row.items() if isinstance(v, int | float) and np.isfinite(v)},
                step=t,
            )
            log.info(
                "task %d (%s): Acc_f %.2f -> %.2f, Acc_r %.2f -> %.2f, Acc_o %.2f, H %.2f%s",
                t,
                task.name,
                row["acc_f_start"],
                row["acc_f"],
                row["acc_r_start"],
                row["acc_r"],
                row["acc_o"],
                row["h"],
                f", zero groups {row['zero_group_ratio']:.2f}" if "zero_group_ratio" in row else "",
            )
            self._save(net, t)
            if self.ctx.stop_after_task is not None and t == self.ctx.stop_after_task and t < n - 1:
                log.warning("stop_after_task=%d: stopping after the checkpoint of task %d", t, t)
                return self._report(completed=False, seconds=time.perf_counter() - t0)
        self.net = net
        return self._report(completed=True, seconds=time.perf_counter() - t0)

    def _row(
        self,
        t: int,
        before: tuple[np.ndarray, np.ndarray],
        after: tuple[np.ndarray, np.ndarray],
        stats: dict[str, Any],
        train_parts: dict[str, float],
        trainable: int,
        total: int,
    ) -> dict[str, Any]:
        task = self.protocol.tasks[t]
        missing = self.protocol.missing
        pre = (self.pre_correct, self.pre_total)
        acc = {
            "acc_f": pooled_accuracy(*after, task.forget),
            "acc_r": pooled_accuracy(*after, task.remain),
            "acc_o": pooled_accuracy(*after, task.old),
            "acc_f_start": pooled_accuracy(*before, task.forget),
            "acc_r_start": pooled_accuracy(*before, task.remain),
            "acc_f_pretrain": pooled_accuracy(*pre, task.forget),
            "acc_r_pretrain": pooled_accuracy(*pre, task.remain),
        }
        if missing:
            acc["acc_m"] = pooled_accuracy(*after, missing)
            acc["acc_m_pretrain"] = pooled_accuracy(*pre, missing)
        ref = acc["acc_f_pretrain"] if self.method.h_reference == "pretrain" else acc["acc_f_start"]
        row: dict[str, Any] = {
            "task": t,
            "name": task.name,
            "forget": list(task.forget),
            **acc,
            "drop": ref - acc["acc_f"],
            "h": h_mean(acc["acc_r"], ref, acc["acc_f"]),
            "trainable_params": int(trainable),
            "trainable_share": trainable / max(total, 1),
            **{f"loss_{k}": v for k, v in train_parts.items()},
        }
        if "group_norms" in stats:
            row["group_norms"] = stats["group_norms"]
            row["delta_w_norms"] = stats["delta_w_norms"]
            row["zero_group_ratio"] = zero_group_ratio(stats["group_norms"], self.method.zero_tol)
            for i, v in enumerate(stats["group_norms"]):
                row[f"group_norm_{i}"] = v
        return row

    def _report(self, *, completed: bool, seconds: float) -> Report:
        rows = self.rows
        p = self.protocol
        results: dict[str, Any] = {
            "method": self.method.name,
            "data": p.name,
            "data_source": p.source,
            "seed": self.ctx.seed,
            "completed": completed,
            "tasks": [_finite(r) for r in rows],
            "task_names": [r["name"] for r in rows],
            "order": p.order,
            "missing": list(p.missing),
            "eval_margin": self.method.eval_margin,
            "h_reference": self.method.h_reference,
            "train_seconds_this_process": seconds,
            **self.method.params(),
        }
        metrics = {}
        if rows:
            metrics = {
                "final/h_mean_over_tasks": float(np.mean([r["h"] for r in rows])),
                "final/acc_r": float(rows[-1]["acc_r"]),
                "final/acc_f_max": float(np.max([r["acc_f"] for r in rows])),
            }
            results |= {k.split("/", 1)[1]: v for k, v in metrics.items()}
        return Report(
            metrics=metrics if completed else {},
            results=results,
            artifacts=self._plots(results) if self.acc.is_main_process and rows else [],
            summary=format_table(rows, self.method.name, p.name),
            completed=completed,
        )

    def _plots(self, res: dict[str, Any]) -> list[Path]:
        from genattr.methods.forgetting.plots import plot_accuracy_curves, plot_group_norms

        folder = self.ctx.output_dir / "plots"
        title = f"{res['method']} on {res['data']} ({res['data_source']}, seed {res['seed']})"
        out = [plot_accuracy_curves(res["tasks"], folder / "accuracy.png", title)]
        if "group_norms" in res["tasks"][0]:
            out.append(plot_group_norms(res["tasks"], folder / "group_norms.png", title))
        return out


def _finite(row: dict[str, Any]) -> dict[str, Any]:
    """NaN (an empty class set, e.g. Acc_o of the first task) becomes null in results.json."""
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in row.items()}


def format_table(rows: list[dict[str, Any]], method: str, data: str) -> str:
    """The per-task table as text (H / Acc_r / Acc_f / Acc_o as in the paper's tables)."""
    lines = [f"{method} on {data}: per task  H / Acc_r / Acc_f / Acc_o  (Acc_f, Acc_r at task start)"]
    for r in rows:
        extra = f"  Acc_m {r['acc_m']:.2f}" if "acc_m" in r else ""
        groups = f"  zero groups {r['zero_group_ratio']:.2f}" if "zero_group_ratio" in r else ""
        lines.append(
            f"  {r['name']:>8}: {r['h']:6.2f} / {r['acc_r']:6.2f} / {r['acc_f']:6.2f} / {r['acc_o']:6.2f}"
            f"  (start {r['acc_f_start']:.2f}, {r['acc_r_start']:.2f}){extra}{groups}"
        )
    return "\n".join(lines)
