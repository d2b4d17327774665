"""The one task loop shared by every continual method (begin / train / end / evaluate).

Per task: grow the network, train on the task's data (+ memory) with Accelerate, herd
the memory, evaluate every seen task, checkpoint. A checkpoint at each task boundary
makes the loop resumable at the next task with the same results.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from genattr.data.base import ContinualProtocol
from genattr.engine.schedule import epoch_lrs, linear_scaled_lr, set_lr
from genattr.methods.base import Report, RunContext
from genattr.methods.continual.base import ContinualMethod
from genattr.methods.continual.memory import ExemplarMemory
from genattr.methods.continual.network import ContinualNet
from genattr.metrics.continual import binary_correct, multi_real_correct, summarize
from genattr.utils.errors import ConfigError
from genattr.utils.instantiate import build
from genattr.utils.seed import rng_state, set_rng_state

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


def param_groups(params: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    """timm's rule: no weight decay on biases and 1-D parameters (norms, gates)."""
    decay = [p for n, p in params if p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in params if p.ndim <= 1 or n.endswith(".bias")]
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


class ContinualLoop:
    def __init__(self, method: ContinualMethod, protocol: ContinualProtocol, ctx: RunContext) -> None:
        self.method = method
        self.protocol = protocol
        self.ctx = ctx
        self.acc = ctx.accelerator
        self.tr = method.trainer
        n = len(protocol.tasks)
        self.R = np.zeros((n, n))
        self.B = np.zeros((n, n))

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
        if opt_cfg.get("scale_lr", True):
            base = linear_scaled_lr(base, global_bs, 1)
        trainable = {id(p) for p in net.trainable_parameters()}
        named = [(n, p) for n, p in net.named_parameters() if id(p) in trainable]
        opt = torch.optim.AdamW(
            param_groups(named, float(opt_cfg["weight_decay"])),
            lr=base,
            eps=float(opt_cfg["eps"]),
            betas=tuple(opt_cfg["betas"]),
        )
        model, opt, loader = self.acc.prepare(net, opt, loader)
        epochs = int(self.tr["epochs"])
        mean_loss = float("nan")
        for epoch, lr in enumerate(epoch_lrs(sch, base, epochs)):
            set_lr(opt, lr)
            model.train()
            total, count = torch.zeros((), device=self.acc.device), 0
            bar = tqdm(
                loader,
                desc=f"task {t} epoch {epoch + 1}/{epochs}",
                leave=False,
                disable=None if self.acc.is_main_process else True,
            )
            for x, y in bar:
                with self.acc.accumulate(model):
                    with self.acc.autocast():
                        out = model(x)
                        loss = self.method.loss(net, out, y)
                    self.acc.backward(loss)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                total += loss.detach().float()
                count += 1
            mean_loss = float(self.acc.reduce(total, "mean")) / max(count, 1)
            step = t * epochs + epoch
            self.ctx.tracker.log_metrics({"train/loss": mean_loss, "train/lr": lr}, step=step)
            log.info(
                "task %d epoch %d/%d: loss %.4f lr %.3g (%d samples)", t, epoch + 1, epochs, mean_loss, lr, len(data)
            )
        self.acc.wait_for_everyone()
        # restore the module's own forward (prepare() wraps it for mixed precision) and drop
        # Accelerate's references, so the next task prepares a fresh wrapper
        self.acc.unwrap_model(model, keep_fp32_wrapper=False)
        self.acc.free_memory()
        return mean_loss

    # -- checkpoints --------------------------------------------------------------------------
    def _save(self, net: ContinualNet, memory: ExemplarMemory, t: int) -> None:
        meta, tensors = rng_state()

        def write(folder: Path) -> None:
            net.save(folder / "model")
            save_file(tensors, str(folder / "rng.safetensors"))

        state = {
            "task": t,
            "task_names": self.protocol.task_names,
            "acc_matrix": self.R.tolist(),
            "binary_matrix": self.B.tolist(),
            "memory": memory.state(),
            "rng": meta,
            "mlflow_run_id": getattr(self.ctx.tracker, "run_id", None),
            "config_fingerprint": self.ctx.config_fingerprint,
        }
        if self.acc.is_main_process:
            self.ctx.checkpoints.save(t, write, state)
        self.acc.wait_for_everyone()

    def _restore(self, net: ContinualNet, memory: ExemplarMemory) -> int:
        """Load the latest checkpoint if any; return the first task still to run."""
        found = self.ctx.checkpoints.latest_for(self.ctx.config_fingerprint, self.protocol.task_names)
        if found is None:
            return 0
        folder, state = found
        last = int(state["task"])
        for t in range(last + 1):
            net.begin_task(t, len(self.protocol.tasks[t].classes), aux_head=self.method.aux_weight > 0)
        net.load(folder / "model")
        net.to(self.acc.device)
        memory.load(state["memory"])
        self.R[:] = np.asarray(state["acc_matrix"])
        self.B[:] = np.asarray(state["binary_matrix"])
        set_rng_state(state["rng"], load_file(str(folder / "rng.safetensors")))
        log.warning("resumed from %s: continuing at task %d", folder, last + 1)
        self.ctx.tracker.log_metrics({"resume/from_task": float(last)}, step=last)
        return last + 1

    # -- the loop -----------------------------------------------------------------------------
    def run(self) -> Report:
        method, protocol, acc = self.method, self.protocol, self.acc
        backbone = build(OmegaConf.create(method.model_cfg))
        net = method.build_net(backbone).to(acc.device)
        mem_cfg = method.memory_cfg
        memory = ExemplarMemory(
            int(mem_cfg.get("size", 0)),
            max_iter=int(mem_cfg.get("max_iter", 1000)),
            seed=self.ctx.seed,
        )
        herd_eval = bool(mem_cfg.get("herd_eval_mode", False))
        start = self._restore(net, memory)
        n = len(protocol.tasks)
        t_start = time.perf_counter()
        for t in range(start, n):
            task = protocol.tasks[t]
            net.begin_task(t, len(task.classes), aux_head=method.aux_weight > 0)
            net.to(acc.device)
            loss = self.train_task(net, t, memory)
            herd_set = task.train if not herd_eval else task.train.with_transform(task.test.transform)
            memory.update(
                herd_set,
                task.classes,
                net.total_classes,
                lambda ds: self._infer(net, ds, "features", train_mode=not herd_eval),
            )
            self.evaluate(net, t)
            stage = summarize(self.R[: t + 1, : t + 1])
            metrics = {f"eval/acc/{protocol.tasks[i].name}": float(self.R[i, t]) for i in range(t + 1)}
            metrics |= {f"eval/binary_acc/{protocol.tasks[i].name}": float(self.B[i, t]) for i in range(t + 1)}
            metrics |= {"eval/stage_avg_acc": stage["stage_avg"][-1], "memory/size": float(len(memory))}
            self.ctx.tracker.log_metrics(metrics, step=t)
            log.info(
                "after task %d (%s): loss %.4f, accuracy on seen tasks %s, memory %s",
                t,
                task.name,
                loss,
                np.round(self.R[: t + 1, t], 2).tolist(),
                memory.counts(),
            )
            self._save(net, memory, t)
            if self.ctx.stop_after_task is not None and t == self.ctx.stop_after_task and t < n - 1:
                log.warning("stop_after_task=%d: stopping after the checkpoint of task %d", t, t)
                return self._report(completed=False, upto=t, seconds=time.perf_counter() - t_start)
        return self._report(completed=True, upto=n - 1, seconds=time.perf_counter() - t_start)

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
