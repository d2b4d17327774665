"""The task loop shared by GS-LoRA and the forgetting baselines.

Per task: evaluate the task-start model, let the method wrap the network, train on
paired batches (an epoch runs over the remaining subset; the forgotten subset is cycled
beside it, as ``engine_cl.py``), let the method finish the task (merge), evaluate, log,
checkpoint. The checkpoint holds the merged network, the per-task table and the RNG
state, so a resumed run continues at the next task with the same results.

As the original (``engine_cl.py:train_one_epoch`` / ``evaluate``), the test split is also
evaluated every ``trainer.eval_every`` optimiser steps of a task, and the point with the
highest H-mean is what a row reports by default (``method.report: best_h``; the carried
model is still the last one, and Acc_o is measured on it after the task, as there).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, TensorDataset

from genattr.data.forgetting import ForgettingProtocol
from genattr.engine.optim import param_groups
from genattr.engine.schedule import epoch_lrs, set_lr
from genattr.methods.base import Report, RunContext
from genattr.methods.forgetting.base import Batch, EpochPlan, ForgettingMethod, TaskData
from genattr.methods.forgetting.pretrain import (
    build_net,
    decode_all,
    effective_model_cfg,
    twin_backbone,
)
from genattr.metrics.forgetting import h_mean, pooled_accuracy, zero_group_ratio
from genattr.utils.errors import ConfigError
from genattr.utils.seed import rng_state, set_rng_state
from genattr.utils.weights import state_dict_cpu

log = logging.getLogger(__name__)


def effective_schedule(trainer_schedule: Mapping[str, Any], method_schedule: Mapping[str, Any]) -> dict[str, Any]:
    """``trainer.schedule`` with the method's own keys on top (``method.schedule``: Retrain's warm-up)."""
    return {**dict(trainer_schedule), **dict(method_schedule)}


def initial_net(model_cfg: dict[str, Any], protocol: ForgettingProtocol, device: torch.device) -> nn.Module:
    """The pre-trained network every forgetting run starts from (``model.weights`` / ``pretrained`` / twin)."""
    cfg = effective_model_cfg(model_cfg, protocol)
    has_weights = cfg.get("weights") is not None or bool(cfg.get("pretrained", False))
    if has_weights:
        net = build_net(cfg, protocol).to(device)
        if protocol.source == "real":
            from genattr.models.imagenet_vit import check_preprocess

            check_preprocess(net, protocol.info)
        return net
    if protocol.source == "twin" and (cfg.get("twin_pretrain") or {}).get("enabled", False):
        return twin_backbone(cfg, protocol, device)
    raise ConfigError(
        "forgetting starts from a pre-trained backbone: set model.weights=<file> (make one with "
        "method=pretrain) or, for the ImageNet ViT, model.pretrained=true"
    )


class _Tagged(Dataset):
    """``(x, y, is_forget)``: the two subsets mixed into one set keep track of which is which."""

    def __init__(self, ds: Dataset, forget: bool) -> None:
        self.ds, self.forget = ds, forget

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        x, y = self.ds[i]
        return x, y, self.forget


class _Split:
    """Selects images by index, from disk or from tensors decoded once (``trainer.preload``).

    With preload only ``keep`` (the budget of every task) is decoded.
    """

    def __init__(self, ds: Any, preload: bool, keep: np.ndarray | None = None) -> None:
        self.ds = ds
        self.labels = np.asarray(ds.labels)
        self.tensors = None
        self.pos: dict[int, int] = {}
        if preload:
            keep = np.arange(len(ds)) if keep is None else np.asarray(keep)
            self.tensors = decode_all(ds.subset(keep)).tensors
            self.pos = {int(i): k for k, i in enumerate(keep)}

    def take(self, idx: np.ndarray) -> Dataset:
        if self.tensors is None:
            return self.ds.subset(idx)
        t = torch.as_tensor([self.pos[int(i)] for i in idx], dtype=torch.long)
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
        self.train = _Split(protocol.train, preload, keep=protocol.train_subset)
        self.test = _Split(protocol.test, preload)
        self.eval_every = int(self.tr["eval_every"])
        # a method's own schedule keys (method.schedule, e.g. Retrain's warm-up) win over trainer.schedule
        self.schedule = effective_schedule(self.tr["schedule"], method.schedule)
        for key, value in method.schedule.items():
            if self.tr["schedule"].get(key) != value:
                log.warning(
                    "method=%s: method.schedule.%s=%s overrides trainer.schedule.%s=%s",
                    method.name,
                    key,
                    value,
                    key,
                    self.tr["schedule"].get(key),
                )
        log.info(
            "forgetting loop: LR schedule stepped %s each epoch (trainer.schedule.step_after_epoch=%s), "
            "test split evaluated every %d steps, rows report %s (method.report), H-mean drop from %s "
            "(method.h_reference); method=%s runs its epochs over the %s set%s",
            "after" if bool(self.schedule["step_after_epoch"]) else "before",
            bool(self.schedule["step_after_epoch"]),
            self.eval_every,
            method.report,
            method.h_reference,
            method.name,
            method.epoch_over,
            " (the other subset cycled beside it)" if method.paired and method.epoch_over != "union" else "",
        )
        self.rows: list[dict[str, Any]] = []
        self.pre_correct: np.ndarray | None = None
        self.pre_total: np.ndarray | None = None

    # -- network ------------------------------------------------------------------------------
    def _initial_net(self) -> nn.Module:
        return initial_net(self.method.model_cfg, self.protocol, self.acc.device)

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, net: nn.Module) -> tuple[np.ndarray, np.ndarray]:
        """Per-class correct / total counts over the whole test split (one pass)."""
        n = self.protocol.n_classes
        correct, total = np.zeros(n), np.zeros(n)
        was = net.training
        net.eval()
        # its own generator: evaluating mid-task must not move the global RNG that training draws from
        loader = DataLoader(
            self.test.all(),
            batch_size=int(self.tr.get("eval_batch_size", 256)),
            shuffle=False,
            generator=torch.Generator(),
        )
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
            drop_last=bool(self.tr["drop_last"]) and len(ds) > bs,
            num_workers=int(self.tr.get("num_workers", 0)),
            generator=gen,
        )

    def _cycle(self, ds: Dataset, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        k = 0
        while True:
            yield from self._loader(ds, seed + 1000 * k)
            k += 1

    def _batches(
        self,
        entry: EpochPlan,
        remain: Dataset,
        forget: Dataset,
        cycles: dict[str, Iterator[tuple[torch.Tensor, torch.Tensor]]],
        seed: int,
    ) -> Iterator[Batch]:
        """The steps of one pass, on the CPU (see :class:`EpochPlan`)."""
        if entry.over == "union":
            for x, y, is_f in self._loader(ConcatDataset([_Tagged(forget, True), _Tagged(remain, False)]), seed):
                f = torch.as_tensor(is_f, dtype=torch.bool)
                yield Batch(x[~f], y[~f], x[f], y[f], phase=entry.phase)
            return
        main, other = (remain, "forget") if entry.over == "remain" else (forget, "remain")
        for x, y in self._loader(main, seed):
            xo, yo = next(cycles[other]) if entry.paired else (x[:0], y[:0])
            extra = next(cycles["remain"]) if entry.extra_remain else None
            if entry.over == "remain":
                yield Batch(x, y, xo, yo, extra, entry.phase)
            else:
                yield Batch(xo, yo, x, y, extra, entry.phase)

    def _to_device(self, b: Batch) -> Batch:
        dev = self.acc.device
        extra = None if b.extra is None else (b.extra[0].to(dev), b.extra[1].to(dev))
        return Batch(b.xr.to(dev), b.yr.to(dev), b.xf.to(dev), b.yf.to(dev), extra, b.phase)

    def optimizer(self, named: list[tuple[str, nn.Parameter]], base: float) -> torch.optim.Optimizer:
        """AdamW with timm's decay rule (the GS-LoRA recipe), or plain Adam (SCRUB: L2 on every parameter)."""
        method, opt_cfg = self.method, self.tr["optimizer"]
        wd = method.weight_decay if method.weight_decay is not None else float(opt_cfg.get("weight_decay", 0.05))
        if method.optimizer == "adam":
            return torch.optim.Adam([p for _, p in named], lr=base, weight_decay=wd)
        betas = tuple(opt_cfg.get("betas", (0.9, 0.999)))
        return torch.optim.AdamW(param_groups(named, wd), lr=base, betas=betas)

    def train_task(
        self, module: nn.Module, t: int, remain: Dataset, forget: Dataset, tracker: _BestH | None = None
    ) -> dict[str, float]:
        method, tr = self.method, self.tr
        named = method.trainable(module)
        if not named:
            raise ConfigError(f"method={method.name} left no trainable parameter")
        base = method.lr if method.lr is not None else float(tr["optimizer"]["lr"])
        opt = self.optimizer(named, base)
        epochs = int(tr["epochs"])
        plan = method.plan(epoch_lrs(self.schedule, base, epochs), base)
        kinds = Counter(f"{e.over}{'+' + e.phase if e.phase else ''}" for e in plan)
        log.info("task %d: %d passes %s, LR %.3g -> %.3g", t, len(plan), dict(kinds), plan[0].lr, plan[-1].lr)
        seed = self.ctx.seed * 7919 + t
        # the other subset is cycled beside the pass (engine_cl.py's prefetcher restarts its loader)
        cycles = {"forget": self._cycle(forget, seed + 17), "remain": self._cycle(remain, seed + 23)}
        parts_sum: dict[str, float] = {}
        steps = 0
        iteration = 0  # optimiser steps in this task (the original's ``batch``)
        for k, entry in enumerate(plan):
            set_lr(opt, entry.lr)
            module.train()
            parts_sum, steps = {}, 0
            for batch in self._batches(entry, remain, forget, cycles, seed + k):
                loss, parts = method.loss(module, self._to_device(batch), t, k)
                opt.zero_grad(set_to_none=True)
                self.acc.backward(loss)
                opt.step()
                for key, v in parts.items():
                    parts_sum[key] = parts_sum.get(key, 0.0) + v
                steps += 1
                # the original's check after each step: (batch + 1) % VER_FREQ == 0 and batch != 0
                due = self.eval_every and (iteration + 1) % self.eval_every == 0 and iteration
                if tracker is not None and entry.evaluate and due:
                    tracker.offer(self.evaluate(module), iteration + 1, k + 1)
                    module.train()
                iteration += 1
            method.end_epoch(module, t, k)
            means = {f"train/{key}": v / max(steps, 1) for key, v in parts_sum.items()}
            self.ctx.tracker.log_metrics({**means, "train/lr": entry.lr}, step=t * len(plan) + k)
            log.debug("task %d pass %d/%d (%s): %s", t, k + 1, len(plan), entry.over, means)
        return {key: v / max(steps, 1) for key, v in parts_sum.items()}

    # -- checkpoints ----------------------------------------------------------------------------
    def _save(self, net: nn.Module, t: int) -> None:
        meta, tensors = rng_state()

        carried = {k: v.detach().cpu().contiguous() for k, v in self.method.state_tensors().items()}

        def write(folder: Path) -> None:
            save_file(state_dict_cpu(net), str(folder / "model.safetensors"))
            save_file(tensors, str(folder / "rng.safetensors"))
            if carried:  # what the method carries across tasks (EWC/MAS/L2 terms, SCRUB-S's average)
                save_file(carried, str(folder / "method.safetensors"))

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
        if (folder / "method.safetensors").is_file():
            self.method.load_state_tensors(load_file(str(folder / "method.safetensors")))
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
            remain_idx, forget_idx = protocol.task_subset(t)
            remain, forget = self.train.take(remain_idx), self.train.take(forget_idx)
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
            tracker = _BestH(self, t, (c0, n0))
            train_parts = self.train_task(module, t, remain, forget, tracker)
            net, stats = method.end_task(module, t)
            c1, n1 = self.evaluate(net)
            row = self._row(t, (c0, n0), (c1, n1), stats, train_parts, trainable, total_params, tracker)
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

    def h_reference_acc(self, t: int, before: tuple[np.ndarray, np.ndarray]) -> float:
        """Acc_f the drop is measured from: task start (the original's ``forget_acc_before``) or pre-trained."""
        counts = (self.pre_correct, self.pre_total) if self.method.h_reference == "pretrain" else before
        return pooled_accuracy(*counts, self.protocol.tasks[t].forget)

    def _row(
        self,
        t: int,
        before: tuple[np.ndarray, np.ndarray],
        after: tuple[np.ndarray, np.ndarray],
        stats: dict[str, Any],
        train_parts: dict[str, float],
        trainable: int,
        total: int,
        tracker: _BestH | None = None,
    ) -> dict[str, Any]:
        task = self.protocol.tasks[t]
        missing = self.protocol.missing
        pre = (self.pre_correct, self.pre_total)
        ref = self.h_reference_acc(t, before)
        last = {
            "acc_f": pooled_accuracy(*after, task.forget),
            "acc_r": pooled_accuracy(*after, task.remain),
        }
        if missing:
            last["acc_m"] = pooled_accuracy(*after, missing)
        last["h"] = h_mean(last["acc_r"], ref, last["acc_f"])
        best = tracker.best if tracker is not None else None
        reported = "best_h" if self.method.report == "best_h" and best is not None else "last"
        if self.method.report == "best_h" and best is None:
            log.warning(
                "task %d: no mid-task evaluation beat H = 0 (trainer.eval_every=%d steps); reporting the last model",
                t,
                self.eval_every,
            )
        shown = last
        if reported == "best_h":
            assert best is not None
            shown = {
                "acc_f": pooled_accuracy(*best.counts, task.forget),
                "acc_r": pooled_accuracy(*best.counts, task.remain),
            }
            if missing:
                shown["acc_m"] = pooled_accuracy(*best.counts, missing)
            shown["h"] = best.h
        acc = {
            **{k: v for k, v in shown.items() if k != "h"},
            "acc_o": pooled_accuracy(*after, task.old),  # the carried (last) model, as the original
            "acc_f_start": pooled_accuracy(*before, task.forget),
            "acc_r_start": pooled_accuracy(*before, task.remain),
            "acc_f_pretrain": pooled_accuracy(*pre, task.forget),
            "acc_r_pretrain": pooled_accuracy(*pre, task.remain),
            **{f"{k}_last": v for k, v in last.items()},
        }
        if missing:
            acc["acc_m_pretrain"] = pooled_accuracy(*pre, missing)
        row: dict[str, Any] = {
            "task": t,
            "name": task.name,
            "forget": list(task.forget),
            **acc,
            "drop": ref - acc["acc_f"],
            "h": shown["h"],
            "reported": reported,
            "best_h_step": best.step if best is not None else None,
            "best_h_epoch": best.epoch if best is not None else None,
            "n_mid_task_evals": tracker.n_evals if tracker is not None else 0,
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
            # which point of each task the rows' acc_f / acc_r / h come from (acc_*_last: the end of the task)
            "reported": self.method.report,
            "eval_every": self.eval_every,
            "step_after_epoch": bool(self.schedule["step_after_epoch"]),
            "schedule": dict(self.schedule),
            "epoch_over": self.method.epoch_over,
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


@dataclass
class _Best:
    """One mid-task evaluation: per-class counts, its H, and when it happened (1-based step/epoch)."""

    counts: tuple[np.ndarray, np.ndarray]
    h: float
    step: int
    epoch: int


class _BestH:
    """Keeps the mid-task evaluation with the highest H (strictly above the best so far, from 0).

    ``engine_cl.py:evaluate`` saves a checkpoint whenever H beats ``highest_H_mean``, which
    starts at 0 every task; the drop there is from ``forget_acc_before`` (the task start).
    """

    def __init__(self, loop: ForgettingLoop, t: int, before: tuple[np.ndarray, np.ndarray]) -> None:
        self.loop, self.t = loop, t
        self.forget = loop.protocol.tasks[t].forget
        self.remain = loop.protocol.tasks[t].remain
        self.ref = loop.h_reference_acc(t, before)
        self.best: _Best | None = None
        self.n_evals = 0

    def offer(self, counts: tuple[np.ndarray, np.ndarray], step: int, epoch: int) -> None:
        self.n_evals += 1
        acc_f, acc_r = pooled_accuracy(*counts, self.forget), pooled_accuracy(*counts, self.remain)
        h = h_mean(acc_r, self.ref, acc_f)
        self.loop.ctx.tracker.log_metrics(
            {f"eval/task{self.t}_acc_f": acc_f, f"eval/task{self.t}_acc_r": acc_r, f"eval/task{self.t}_h": h}, step=step
        )
        if h > (self.best.h if self.best is not None else 0.0):
            self.best = _Best(counts, h, step, epoch)


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
