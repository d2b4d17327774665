"""The forgetting family (GS-LoRA and the baselines) as stages of the engine: one stage per task.

Per task: evaluate the task-start model, let the method wrap the network, train on
paired batches (an epoch runs over the remaining subset; the forgotten subset is cycled
beside it, as ``engine_cl.py``), let the method finish the task (merge), evaluate, log.
Restoring, checkpointing (the merged network, the rows, the pre-trained counts, the
method's own tensors and the RNG state, so a resumed run ends with the same table) and
stopping are the engine's (:mod:`genattr.engine.stages`).

Every step goes through Accelerate (:func:`~genattr.engine.training.prepared` +
:func:`~genattr.engine.training.optimizer_step`): the trained module and its optimiser are
prepared per task, the forward runs under autocast. Under several processes every process
draws the same global batches (same seeded generators, the original's order) and trains on
its rows of each (:func:`~genattr.methods.forgetting.base.process_rows`); evaluations share
the test split out and add the per-class counts up.

As the original (``engine_cl.py:train_one_epoch`` / ``evaluate``), the test split is also
evaluated every ``trainer.eval_every`` optimiser steps of a task, and the point with the
highest H-mean is what a row reports by default (``method.report: best_h``; the carried
model is still the last one, and Acc_o is measured on it after the task, as there).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, TensorDataset

from genattr.data.forgetting import ForgettingProtocol
from genattr.engine.optim import param_groups
from genattr.engine.progress import track
from genattr.engine.schedule import epoch_lrs, set_lr
from genattr.engine.stages import StagedRun
from genattr.engine.training import optimizer_step, per_process, prepared, shard
from genattr.methods.base import Report, RunContext
from genattr.methods.forgetting.base import (
    Batch,
    EpochPlan,
    ForgettingMethod,
    TaskData,
    check_one_step_per_batch,
    process_rows,
)
from genattr.methods.forgetting.pretrain import (
    build_net,
    decode_all,
    effective_model_cfg,
    twin_backbone,
)
from genattr.metrics.forgetting import h_mean, pooled_accuracy, zero_group_ratio
from genattr.utils.errors import ConfigError
from genattr.utils.weights import state_dict_cpu

log = logging.getLogger(__name__)


def effective_schedule(trainer_schedule: Mapping[str, Any], method_schedule: Mapping[str, Any]) -> dict[str, Any]:
    """``trainer.schedule`` with the method's own keys on top (``method.schedule``: Retrain's warm-up)."""
    return {**dict(trainer_schedule), **dict(method_schedule)}


def initial_net(model_cfg: dict[str, Any], protocol: ForgettingProtocol, device: torch.device) -> nn.Module:
    """The pre-trained network every forgetting run starts from (``model.weights`` / ``pretrained`` / twin).

    The twin's backbone (:func:`~genattr.methods.forgetting.pretrain.twin_backbone`) is part of the synthetic
    twin: trained once in plain fp32 torch and cached, outside the run's Accelerator.
    """
    cfg = effective_model_cfg(model_cfg, protocol)
    has_weights = cfg["weights"] is not None or bool(cfg.get("pretrained"))  # only some model options have it
    if has_weights:
        net = build_net(cfg, protocol).to(device)
        if protocol.source == "real":
            from genattr.models.imagenet_vit import check_preprocess

            check_preprocess(net, protocol.info)
        return net
    if protocol.source == "twin" and cfg["twin_pretrain"]["enabled"]:
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


def _rows(acc: Any, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """This process's rows of tensors that share their first dimension (:func:`process_rows`)."""
    r = process_rows(acc, len(tensors[0]))
    return tuple(t[r.start : r.stop] for t in tensors)


class ForgettingLoop:
    """The forgetting family on the engine: one stage per task (evaluate, wrap, train, merge, evaluate)."""

    stage_kind = "task"

    def __init__(self, method: ForgettingMethod, protocol: ForgettingProtocol, ctx: RunContext) -> None:
        if getattr(protocol, "kind", None) != "forgetting":
            raise ConfigError(f"method={method.name} needs a forgetting protocol, got {type(protocol).__name__}")
        self.method, self.protocol, self.ctx = method, protocol, ctx
        self.acc = ctx.accelerator
        self.tr = method.trainer
        check_one_step_per_batch(self.acc)
        preload = bool(self.tr["preload"])
        self.train = _Split(protocol.train, preload, keep=protocol.train_subset)
        self.test = _Split(protocol.test, preload)
        self.eval_every = int(self.tr["eval_every"])
        # a method's own schedule keys (method.schedule, e.g. Retrain's warm-up) win over trainer.schedule
        self.schedule = effective_schedule(self.tr["schedule"], method.schedule)
        for key, value in method.schedule.items():
            if self.tr["schedule"][key] != value:
                log.warning(
                    "method=%s: method.schedule.%s=%s overrides trainer.schedule.%s=%s",
                    method.name,
                    key,
                    value,
                    key,
                    self.tr["schedule"][key],
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
        self.net = initial_net(method.model_cfg, protocol, self.acc.device)
        self.total_params = sum(p.numel() for p in self.net.parameters())
        self.t_start = time.perf_counter()
        self.seen = 0  # training rows this process trained on (results.json: per_process)

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, net: nn.Module) -> tuple[np.ndarray, np.ndarray]:
        """Per-class correct / total counts over the whole test split (one pass, shared out among the
        processes, the counts added up)."""
        n = self.protocol.n_classes
        correct, total = np.zeros(n), np.zeros(n)
        was = net.training
        net.eval()
        test = self.test.all()
        if self.acc.num_processes > 1:
            mine = shard(self.acc, len(test))  # type: ignore[arg-type]
            test = Subset(test, mine)
        # its own generator: evaluating mid-task must not move the global RNG that training draws from
        loader = DataLoader(
            test,
            batch_size=int(self.tr["eval_batch_size"]),
            shuffle=False,
            generator=torch.Generator(),
        )
        for x, y in loader:
            x, y = x.to(self.acc.device), y.to(self.acc.device)
            with self.acc.autocast():
                logits, _ = net(x, y if self.method.eval_margin else None)
            hit = (logits.argmax(1) == y).cpu().numpy()
            yc = y.cpu().numpy()
            np.add.at(correct, yc, hit)
            np.add.at(total, yc, 1)
        net.train(was)
        if self.acc.num_processes > 1:
            both = self.acc.reduce(torch.as_tensor(np.stack([correct, total]), device=self.acc.device), "sum")
            correct, total = both.cpu().numpy()
        return correct, total

    # -- training -----------------------------------------------------------------------------
    def _loader(self, ds: Dataset, seed: int) -> DataLoader:
        """One pass over ``ds`` in global batches of ``trainer.batch_size`` (the same on every process)."""
        bs = int(self.tr["batch_size"])
        gen = torch.Generator().manual_seed(seed)
        return DataLoader(
            ds,
            batch_size=bs,
            shuffle=True,
            drop_last=bool(self.tr["drop_last"]) and len(ds) > bs,
            num_workers=int(self.tr["num_workers"]),
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
        """This process's rows of the steps of one pass, on the CPU (see :class:`EpochPlan`).

        The global batches are drawn as on one process; the forgotten labels the method trains with
        (:meth:`~genattr.methods.forgetting.base.ForgettingMethod.forget_labels`) are drawn on the global
        batch; then each process keeps its rows (:func:`_rows`).
        """
        relabel, acc = self.method.forget_labels, self.acc
        if entry.over == "union":
            for x, y, is_f in self._loader(ConcatDataset([_Tagged(forget, True), _Tagged(remain, False)]), seed):
                f = torch.as_tensor(is_f, dtype=torch.bool)
                y = y.clone()
                y[f] = relabel(y[f])
                x, y, f = _rows(acc, x, y, f)  # a mixed batch is shared out as one
                yield Batch(x[~f], y[~f], x[f], y[f], phase=entry.phase)
            return
        main, other = (remain, "forget") if entry.over == "remain" else (forget, "remain")
        for x, y in self._loader(main, seed):
            xo, yo = next(cycles[other]) if entry.paired else (x[:0], y[:0])
            extra = next(cycles["remain"]) if entry.extra_remain else None
            xr, yr, xf, yf = (x, y, xo, yo) if entry.over == "remain" else (xo, yo, x, y)
            xr, yr = _rows(acc, xr, yr)
            xf, yf = _rows(acc, xf, relabel(yf))
            yield Batch(xr, yr, xf, yf, None if extra is None else _rows(acc, *extra), entry.phase)

    def _to_device(self, b: Batch) -> Batch:
        dev = self.acc.device
        extra = None if b.extra is None else (b.extra[0].to(dev), b.extra[1].to(dev))
        return Batch(b.xr.to(dev), b.yr.to(dev), b.xf.to(dev), b.yf.to(dev), extra, b.phase)

    def optimizer(self, named: list[tuple[str, nn.Parameter]], base: float) -> torch.optim.Optimizer:
        """AdamW with timm's decay rule (the GS-LoRA recipe), or plain Adam (SCRUB: L2 on every parameter)."""
        method, opt_cfg = self.method, self.tr["optimizer"]
        wd = method.weight_decay if method.weight_decay is not None else float(opt_cfg["weight_decay"])
        if method.optimizer == "adam":
            return torch.optim.Adam([p for _, p in named], lr=base, weight_decay=wd)
        return torch.optim.AdamW(param_groups(named, wd), lr=base, betas=tuple(opt_cfg["betas"]))

    def train_task(
        self, module: nn.Module, t: int, remain: Dataset, forget: Dataset, tracker: _BestH | None = None
    ) -> dict[str, float]:
        """Train ``module`` for task ``t`` through Accelerate; return the mean loss parts of the last pass."""
        method, tr, acc = self.method, self.tr, self.acc
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
        means: dict[str, float] = {}
        iteration = 0  # optimiser steps in this task (the original's ``batch``)
        with prepared(acc, module, opt) as p:
            passes = track(
                list(enumerate(plan)), desc=f"task {t} passes", unit="pass", main_process=acc.is_main_process
            )
            for k, entry in passes:
                set_lr(p.optimizer, entry.lr)
                p.model.train()
                parts_sum: dict[str, float] = defaultdict(float)
                steps = 0
                for batch in self._batches(entry, remain, forget, cycles, seed + k):
                    b = self._to_device(batch)
                    parts: dict[str, float] = {}

                    def loss_fn(model: nn.Module, b: Batch = b, k: int = k, parts: dict = parts) -> torch.Tensor:
                        loss, got = method.loss(model, module, b, t, k)
                        parts.update(got)
                        return loss

                    optimizer_step(acc, p, loss_fn)
                    for key, v in parts.items():
                        parts_sum[key] += v
                    steps += 1
                    self.seen += len(b.yr) + len(b.yf) + (0 if b.extra is None else len(b.extra[1]))
                    # the original's check after each step: (batch + 1) % VER_FREQ == 0 and batch != 0
                    due = self.eval_every and (iteration + 1) % self.eval_every == 0 and iteration
                    if tracker is not None and entry.evaluate and due:
                        tracker.offer(self.evaluate(module), iteration + 1, k + 1)
                        p.model.train()
                    iteration += 1
                    if p.capped:  # trainer.max_steps
                        break
                method.end_epoch(module, t, k)
                means = {key: v / max(steps, 1) for key, v in self._mean_over_processes(parts_sum).items()}
                logged = {f"train/{key}": v for key, v in means.items()}
                self.ctx.tracker.log_metrics({**logged, "train/lr": entry.lr}, step=t * len(plan) + k)
                log.debug("task %d pass %d/%d (%s): %s", t, k + 1, len(plan), entry.over, logged)
                if p.capped:
                    break
        return means

    def _mean_over_processes(self, sums: Mapping[str, float]) -> dict[str, float]:
        """Per-process loss sums averaged over the processes (each summed the losses of its rows)."""
        if self.acc.num_processes == 1 or not sums:
            return dict(sums)
        keys = sorted(sums)
        mean = self.acc.reduce(torch.tensor([sums[k] for k in keys], dtype=torch.float64), "mean")
        return dict(zip(keys, mean.tolist(), strict=True))

    # -- the engine's stages: one per task ------------------------------------------------------
    def stage_names(self) -> list[str]:
        return list(self.protocol.task_names)

    def identity(self) -> dict[str, Any]:
        return {"task_names": list(self.protocol.task_names)}

    def run_stage(self, t: int) -> dict[str, float]:
        method, protocol = self.method, self.protocol
        if self.pre_correct is None:  # the pre-trained model, before the first task
            self.pre_correct, self.pre_total = self.evaluate(self.net)
        task = protocol.tasks[t]
        ts = time.perf_counter()
        c0, n0 = self.evaluate(self.net)
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
            accelerator=self.acc,
        )
        module = method.begin_task(self.net, data)
        trainable = sum(p.numel() for _, p in method.trainable(module))
        tracker = _BestH(self, t, (c0, n0))
        train_parts = self.train_task(module, t, remain, forget, tracker)
        self.net, stats = method.end_task(module, t)
        c1, n1 = self.evaluate(self.net)
        row = self._row(t, (c0, n0), (c1, n1), stats, train_parts, trainable, self.total_params, tracker)
        row["seconds"] = time.perf_counter() - ts
        self.rows.append(row)
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
        return {f"task/{k}": float(v) for k, v in row.items() if isinstance(v, int | float) and np.isfinite(v)}

    def checkpoint(self, t: int) -> tuple[Callable[[Path], None], dict[str, Any]]:
        carried = {k: v.detach().cpu().contiguous() for k, v in self.method.state_tensors().items()}
        weights = state_dict_cpu(self.net)

        def write(folder: Path) -> None:
            save_file(weights, str(folder / "model.safetensors"))
            if carried:  # what the method carries across tasks (EWC/MAS/L2 terms, SCRUB-S's average)
                save_file(carried, str(folder / "method.safetensors"))

        assert self.pre_correct is not None and self.pre_total is not None
        state = {
            "rows": self.rows,  # the per-task table, best-H points included
            "pretrain_correct": self.pre_correct.tolist(),
            "pretrain_total": self.pre_total.tolist(),
        }
        return write, state

    def restore(self, folder: Path, state: Mapping[str, Any]) -> None:
        self.net.load_state_dict(load_file(str(folder / "model.safetensors")))
        if (folder / "method.safetensors").is_file():
            self.method.load_state_tensors(load_file(str(folder / "method.safetensors")))
        self.rows = list(state["rows"])
        self.pre_correct = np.asarray(state["pretrain_correct"])
        self.pre_total = np.asarray(state["pretrain_total"])

    def report(self, *, completed: bool, last: int) -> Report:
        return self._report(completed=completed, seconds=time.perf_counter() - self.t_start)

    def run(self) -> Report:
        title = f"{self.method.name} on {self.protocol.name} ({self.protocol.source})"
        return StagedRun(self, self.ctx, title=title).run()

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
            "per_process": {"train_samples": per_process(self.acc, self.seen)},
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
