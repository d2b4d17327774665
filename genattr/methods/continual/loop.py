"""The continual family (LoRAX, DER, replay, joint) as stages of the engine: one stage per task.

Per task: grow the network, train on the task's data (+ memory) through Accelerate, herd the memory,
evaluate every seen task. Restoring, checkpointing (with the RNG state, so a resumed run ends with the
same results) and stopping are the engine's (:mod:`genattr.engine.stages`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset

from genattr.data.base import ContinualProtocol
from genattr.engine.optim import param_groups
from genattr.engine.progress import track
from genattr.engine.schedule import epoch_lrs, linear_scaled_lr, set_lr
from genattr.engine.stages import StagedRun
from genattr.engine.training import optimizer_step, per_process, prepared
from genattr.methods.base import Report, RunContext
from genattr.methods.continual.base import ContinualMethod
from genattr.methods.continual.memory import ExemplarMemory
from genattr.methods.continual.network import ContinualNet
from genattr.metrics.continual import binary_correct, multi_real_correct, summarize
from genattr.utils.errors import ConfigError
from genattr.utils.instantiate import build

log = logging.getLogger(__name__)


class _Indexed(Dataset):
    """Wraps a dataset to also return the sample index (to re-order gathered outputs)."""

    def __init__(self, base: Dataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        x, y = self.base[i]
        return x, y, i


class ContinualLoop:
    """The continual family on the engine: one stage per task (grow, train, herd, evaluate)."""

    stage_kind = "task"

    def __init__(self, method: ContinualMethod, protocol: ContinualProtocol, ctx: RunContext) -> None:
        self.method = method
        self.protocol = protocol
        self.ctx = ctx
        self.acc = ctx.accelerator
        self.tr = method.trainer
        n = len(protocol.tasks)
        self.R = np.zeros((n, n))
        self.B = np.zeros((n, n))
        self.net = method.build_net(build(OmegaConf.create(method.model_cfg))).to(self.acc.device)
        mem_cfg = method.memory_cfg
        self.memory = ExemplarMemory(int(mem_cfg["size"]), max_iter=int(mem_cfg["max_iter"]), seed=ctx.seed)
        self.herd_eval = bool(mem_cfg["herd_eval_mode"])
        self.t_start = time.perf_counter()
        self.seen = 0  # training samples this process iterated (results.json: per_process)

    # -- inference helpers ------------------------------------------------------------------
    @torch.no_grad()
    def _infer(self, net: ContinualNet, dataset: Dataset, what: str, train_mode: bool = False) -> np.ndarray:
        """Run ``net`` over ``dataset`` on all ranks; return outputs in dataset order."""
        loader = DataLoader(
            _Indexed(dataset),
            batch_size=int(self.tr["eval_batch_size"]),
            shuffle=False,
            num_workers=int(self.tr["num_workers"]),
        )
        loader = self.acc.prepare_data_loader(loader)
        was_training = net.training
        net.train(train_mode)
        outs, idxs = [], []
        for x, _, i in loader:
            if what == "features":  # herding runs in fp32 without autocast, as the original
                out = net.features(x)
            else:
                with self.acc.autocast():
                    out = net(x)["logits"].argmax(1)
            out, i = self.acc.gather_for_metrics((out.float(), i))
            outs.append(out.cpu())
            idxs.append(i.cpu())
        net.train(was_training)
        order = torch.cat(idxs).argsort()
        return torch.cat(outs)[order].numpy()

    def evaluate(self, net: ContinualNet, stage: int) -> None:
        for i in range(stage + 1):
            test = self.protocol.tasks[i].test
            pred = self._infer(net, test, "logits").astype(np.int64)
            self.R[i, stage] = 100.0 * multi_real_correct(pred, test.labels).mean()
            self.B[i, stage] = 100.0 * binary_correct(pred, test.labels).mean()

    # -- training -----------------------------------------------------------------------------
    def train_task(self, net: ContinualNet, t: int, memory: ExemplarMemory) -> float:
        data = self.method.training_data(t, self.protocol, memory)
        world = self.acc.num_processes
        accum = self.acc.gradient_accumulation_steps
        global_bs = int(self.tr["batch_size"])
        if global_bs % (world * accum):
            raise ConfigError(
                f"trainer.batch_size={global_bs} must be divisible by processes x grad_accum = {world * accum}."
            )
        per_step = global_bs // (world * accum)
        gen = torch.Generator().manual_seed(self.ctx.seed * 7919 + t)
        loader = DataLoader(
            data,
            batch_size=per_step,
            shuffle=True,
            drop_last=len(data) > global_bs,
            num_workers=int(self.tr["num_workers"]),
            generator=gen,
        )
        opt_cfg, sch = self.tr["optimizer"], self.tr["schedule"]
        base = float(opt_cfg["lr"] if t == 0 else opt_cfg["incremental_lr"])
        if opt_cfg["scale_lr"]:
            base = linear_scaled_lr(base, global_bs, 1)
        trainable = {id(p) for p in net.trainable_parameters()}
        named = [(n, p) for n, p in net.named_parameters() if id(p) in trainable]
        opt = torch.optim.AdamW(
            param_groups(named, float(opt_cfg["weight_decay"])),
            lr=base,
            eps=float(opt_cfg["eps"]),
            betas=tuple(opt_cfg["betas"]),
        )
        epochs = int(self.tr["epochs"])
        mean_loss = float("nan")
        with prepared(self.acc, net, opt, loader) as p:
            for epoch, lr in enumerate(epoch_lrs(sch, base, epochs)):
                set_lr(p.optimizer, lr)
                p.model.train()
                total, count = torch.zeros((), device=self.acc.device), 0
                batches = track(
                    p.loader,
                    desc=f"task {t} epoch {epoch + 1}/{epochs}",
                    unit="batch",
                    main_process=self.acc.is_main_process,
                )
                for x, y in batches:
                    loss = optimizer_step(self.acc, p, lambda model, x=x, y=y: self.method.loss(net, model(x), y))
                    total += loss.float()
                    count += 1
                    self.seen += len(y)
                    if p.capped:  # trainer.max_steps
                        break
                mean_loss = float(self.acc.reduce(total, "mean")) / max(count, 1)
                step = t * epochs + epoch
                self.ctx.tracker.log_metrics({"train/loss": mean_loss, "train/lr": lr}, step=step)
                log.info(
                    "task %d epoch %d/%d: loss %.4f lr %.3g (%d samples)",
                    t,
                    epoch + 1,
                    epochs,
                    mean_loss,
                    lr,
                    len(data),
                )
                if p.capped:
                    break
        return mean_loss

    # -- the engine's stages: one per task ---------------------------------------------------------
    def stage_names(self) -> list[str]:
        return list(self.protocol.task_names)

    def identity(self) -> dict[str, Any]:
        return {"task_names": list(self.protocol.task_names)}

    def run_stage(self, t: int) -> dict[str, float]:
        method, protocol, net, memory = self.method, self.protocol, self.net, self.memory
        task = protocol.tasks[t]
        net.begin_task(t, len(task.classes), aux_head=method.aux_weight > 0)
        net.to(self.acc.device)
        loss = self.train_task(net, t, memory)
        herd_set = task.train if not self.herd_eval else task.train.with_transform(task.test.transform)
        memory.update(
            herd_set,
            task.classes,
            net.total_classes,
            lambda ds: self._infer(net, ds, "features", train_mode=not self.herd_eval),
        )
        self.evaluate(net, t)
        stage = summarize(self.R[: t + 1, : t + 1])
        metrics = {f"eval/acc/{protocol.tasks[i].name}": float(self.R[i, t]) for i in range(t + 1)}
        metrics |= {f"eval/binary_acc/{protocol.tasks[i].name}": float(self.B[i, t]) for i in range(t + 1)}
        metrics |= {"eval/stage_avg_acc": stage["stage_avg"][-1], "memory/size": float(len(memory))}
        log.info(
            "after task %d (%s): loss %.4f, accuracy on seen tasks %s, memory %s",
            t,
            task.name,
            loss,
            np.round(self.R[: t + 1, t], 2).tolist(),
            memory.counts(),
        )
        return metrics

    def checkpoint(self, t: int) -> tuple[Callable[[Path], None], dict[str, Any]]:
        state = {
            "acc_matrix": self.R.tolist(),
            "binary_matrix": self.B.tolist(),
            "memory": self.memory.state(),
        }
        return lambda folder: self.net.save(folder / "model"), state

    def restore(self, folder: Path, state: Mapping[str, Any]) -> None:
        for t in range(int(state["task"]) + 1):
            self.net.begin_task(t, len(self.protocol.tasks[t].classes), aux_head=self.method.aux_weight > 0)
        self.net.load(folder / "model")
        self.net.to(self.acc.device)
        self.memory.load(state["memory"])
        self.R[:] = np.asarray(state["acc_matrix"])
        self.B[:] = np.asarray(state["binary_matrix"])

    def report(self, *, completed: bool, last: int) -> Report:
        return self._report(completed=completed, upto=last, seconds=time.perf_counter() - self.t_start)

    def run(self) -> Report:
        title = f"{self.method.name} on {self.protocol.name} ({self.protocol.source})"
        return StagedRun(self, self.ctx, title=title).run()

    def _report(self, *, completed: bool, upto: int, seconds: float) -> Report:
        k = upto + 1
        R, B = self.R[:k, :k], self.B[:k, :k]
        s = summarize(R)
        sb = summarize(B)
        results = {
            "acc_matrix": R.tolist(),
            "binary_matrix": B.tolist(),
            "aa": s["aa"],
            "aaf": s["aaf"],
            "bwt": s["bwt"],
            "forgetting": s["forgetting"],
            "stage_avg": s["stage_avg"],
            "binary_aa": sb["aa"],
            "binary_aaf": sb["aaf"],
            "task_names": self.protocol.task_names[:k],
            "method": self.method.name,
            "data": self.protocol.name,
            "data_source": self.protocol.source,
            "seed": self.ctx.seed,
            "completed": completed,
            "train_seconds_this_process": seconds,
            "per_process": {"train_samples": per_process(self.acc, self.seen)},
        } | {k2: v for k2, v in self.method.params().items() if v is not None}
        metrics = {
            "final/aa": s["aa"],
            "final/aaf": s["aaf"],
            "final/bwt": s["bwt"],
            "final/forgetting": s["forgetting"],
            "final/binary_aaf": sb["aaf"],
        }
        return Report(
            metrics=metrics if completed else {},
            results=results,
            artifacts=self._plots(results) if self.acc.is_main_process else [],
            summary=format_matrix(R, self.protocol.task_names[:k], s),
            completed=completed,
        )

    def _plots(self, res: dict[str, Any]) -> list[Path]:
        """Accuracy-matrix heatmap and stage curve under ``<output>/plots``."""
        from genattr.tracking.plots import plot_accuracy_matrix, plot_stage_curve

        plots = self.ctx.output_dir / "plots"
        plots.mkdir(parents=True, exist_ok=True)
        names = res["task_names"]
        title = f"{res['method']} on {res['data']} ({res['data_source']}, seed {res['seed']})"
        plot_accuracy_matrix(res["acc_matrix"], names, plots / "acc_matrix.png", title)
        plot_stage_curve({"multi-real": res["stage_avg"]}, names, plots / "stage_avg.png", "average accuracy (%)")
        return [plots / "acc_matrix.png", plots / "stage_avg.png"]


def format_matrix(R: np.ndarray, names: list[str], s: dict[str, Any]) -> str:
    """The accuracy matrix as text (rows = evaluated task, columns = after training task)."""
    w = max(8, *(len(n) for n in names)) + 1
    lines = [
        "accuracy matrix R[i, j] (multi-real %, row = evaluated task, column = after task j)",
        " " * w + "".join(f"{n[:8]:>9}" for n in names),
    ]
    for i, n in enumerate(names):
        lines.append(f"{n:<{w}}" + "".join(f"{R[i, j]:9.2f}" if i <= j else f"{'':>9}" for j in range(len(names))))
    lines.append(f"AA {s['aa']:.2f}  AAF {s['aaf']:.2f}  BWT {s['bwt']:.2f}  forgetting {s['forgetting']:.2f}")
    return "\n".join(lines)
