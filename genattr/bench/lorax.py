"""LoRAX training / evaluation throughput: skipping old adapters' backward, and batched experts.

For T = 1..N adapters, three paths are timed on the same inputs with the same dropout masks:

* ``sequential``: old adapters under ``no_grad``, one backbone pass per adapter;
* ``reference_grad``: the original, the graph kept through every old adapter (sequential passes);
* ``batched``: old adapters under ``no_grad`` in one pass over T stacked copies of the batch
  (``method.experts=batched``, the default).

A training step is the forward through every adapter and the backward (the optimiser step, the
same for all paths, is left out); evaluation is a ``no_grad`` forward. The first step's losses of the
three paths are asserted equal and the batched evaluation logits equal to the sequential ones, so the
speed-ups change nothing in the maths. ``speedup_train`` (sequential / reference_grad) is the gain of
skipping the old adapters' backward; ``speedup_{train,eval}_batched`` (batched / sequential) that of
batching the experts. The paths are timed in turns (one call of each per round, the median of the
rounds), so a busy machine slows all of them alike. Peak memory is reported too, and on a GPU the
same figures under bf16 autocast.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import timm
import torch

from genattr.bench.common import device_info, peak_memory_mb, reset_peak, write_json
from genattr.methods.continual.lorax import LoRAXNet

log = logging.getLogger(__name__)
LORA = {"r": 64, "lora_alpha": 16, "lora_dropout": 0.1, "bias": "none"}
#: path -> (reference_grad, experts)
PATHS = {"sequential": (False, "sequential"), "reference_grad": (True, "sequential"), "batched": (False, "batched")}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="convit_tiny", help="timm ConViT name (random init)")
    p.add_argument("--img-size", type=int, default=None, help="default: 224 on GPU, 112 on CPU")
    p.add_argument("--batch", type=int, default=None, help="default: 32 on GPU, 8 on CPU")
    p.add_argument("--tasks", type=int, default=5, help="largest number of adapters T")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (each times every path once)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--out", default="bench_results/lorax.json")


def _net(args: argparse.Namespace, path: str, n_tasks: int, device: torch.device) -> LoRAXNet:
    reference, experts = PATHS[path]
    torch.manual_seed(0)
    backbone = timm.create_model(args.model, pretrained=False, num_classes=0, img_size=args.img_size)
    net = LoRAXNet(backbone, LORA, "gpsa_qk_v", reference, args.model, experts=experts)
    for t in range(n_tasks):
        net.begin_task(t, 2, aux_head=True)
        with torch.no_grad():  # non-zero B: every adapter changes the features, so a wrong expert shows
            for name, p in net.peft.named_parameters():
                if f"lora_B.task{t}." in name:
                    p.normal_(0, 0.02)
    return net.to(device)


def _autocast(device: torch.device, amp: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    return torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()


def _train_fn(net: LoRAXNet, x: torch.Tensor, y: torch.Tensor, amp: torch.dtype | None) -> Callable[[], float]:
    params = net.trainable_parameters()

    def step() -> float:
        net.train()
        torch.manual_seed(1234)  # identical dropout masks for every path
        with _autocast(x.device, amp):
            out = net(x)
            loss = torch.nn.functional.cross_entropy(out["logits"], y)
            if "aux_logits" in out:  # the div head exists from the second task on
                loss = loss + 0.1 * torch.nn.functional.cross_entropy(out["aux_logits"], net.aux_targets(y))
        for p in params:
            p.grad = None
        loss.backward()
        return loss.item()

    return step


def _eval_fn(net: LoRAXNet, x: torch.Tensor, amp: torch.dtype | None) -> Callable[[], torch.Tensor]:
    def infer() -> torch.Tensor:
        net.eval()
        with torch.no_grad(), _autocast(x.device, amp):
            return net(x)["logits"]

    return infer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_in_turns(
    fns: dict[str, Callable[[], Any]], device: torch.device, warmup: int, repeats: int
) -> dict[str, float]:
    """Median seconds per call of each function, timed one call of each per round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def _peak(fn: Callable[[], Any], device: torch.device) -> float:
    reset_peak(device)
    fn()
    _sync(device)
    return peak_memory_mb(device)


def _measure(args: argparse.Namespace, device: torch.device, amp: torch.dtype | None) -> list[dict[str, Any]]:
    rows = []
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=g).to(device)
    tol = 1e-2 if amp else 1e-5
    # batched experts run T x B images through each kernel: on a GPU, cuDNN / cuBLAS may pick other algorithms
    # (TF32 convolutions included) than for B images, so the comparison allows their rounding
    btol = 5e-2 if amp else (1e-3 if device.type == "cuda" else 1e-5)
    for n_tasks in range(1, args.tasks + 1):
        y = torch.randint(0, 2 * n_tasks, (args.batch,), generator=g).to(device)
        nets = {path: _net(args, path, n_tasks, device) for path in PATHS}
        # one pass in training mode records the LoRA layer calls the batched path draws dropout masks for
        with torch.no_grad():
            nets["batched"].train()(x)
        train = {path: _train_fn(net, x, y, amp) for path, net in nets.items()}
        infer = {path: _eval_fn(nets[path], x, amp) for path in ("sequential", "batched")}
        losses = {path: step() for path, step in train.items()}  # same weights, same masks
        scale = max(1.0, abs(losses["sequential"]))
        if abs(losses["reference_grad"] - losses["sequential"]) > tol * scale:
            raise AssertionError(f"T={n_tasks}: losses differ {losses}")
        if abs(losses["batched"] - losses["sequential"]) > btol * scale:
            raise AssertionError(f"T={n_tasks}: losses differ {losses}")
        logits = {path: fn().float() for path, fn in infer.items()}
        if not torch.allclose(logits["batched"], logits["sequential"], rtol=btol, atol=btol):
            raise AssertionError(f"T={n_tasks}: batched experts' logits differ from the sequential ones")
        row: dict[str, Any] = {"tasks": n_tasks}
        sec = _timed_in_turns(train, device, args.warmup, args.repeats)
        row.update({f"train_img_s_{p}": args.batch / s for p, s in sec.items()})
        sec = _timed_in_turns(infer, device, args.warmup, args.repeats)
        row.update({f"eval_img_s_{p}": args.batch / s for p, s in sec.items()})
        row.update({f"train_peak_mem_mb_{p}": _peak(fn, device) for p, fn in train.items()})
        row.update({f"eval_peak_mem_mb_{p}": _peak(fn, device) for p, fn in infer.items()})
        row.update({f"loss_{p}": v for p, v in losses.items()})
        row["speedup_train"] = row["train_img_s_sequential"] / row["train_img_s_reference_grad"]
        row["speedup_train_batched"] = row["train_img_s_batched"] / row["train_img_s_sequential"]
        row["speedup_eval_batched"] = row["eval_img_s_batched"] / row["eval_img_s_sequential"]
        row["speedup_train_batched_vs_reference"] = row["train_img_s_batched"] / row["train_img_s_reference_grad"]
        log.info("T=%d: %s", n_tasks, {k: round(v, 3) for k, v in row.items()})
        rows.append(row)
        del nets, train, infer
    return rows


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    last = rows[-1]
    t = last["tasks"]
    return {
        f"speedup_train_T{t}": last["speedup_train"],
        f"speedup_train_batched_T{t}": last["speedup_train_batched"],
        f"speedup_eval_batched_T{t}": last["speedup_eval_batched"],
        "ceiling_speedup_train": 2 * t / (t + 1),
        "goal": ">= 1.6x skipping the old adapters' backward at T = 5; batched experts >= 1.5x eval on a GPU, "
        "no slower on CPU",
    }


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.img_size = args.img_size or (224 if device.type == "cuda" else 112)
    args.batch = args.batch or (32 if device.type == "cuda" else 8)
    load_before = os.getloadavg()
    result: dict[str, Any] = {
        "benchmark": "lorax",
        "model": args.model,
        "img_size": args.img_size,
        "batch": args.batch,
        "lora": LORA,
        "targets": "gpsa_qk_v",
        **device_info(device),
        "fp32": _measure(args, device, None),
    }
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        result["bf16"] = _measure(args, device, torch.bfloat16)
    # 1-minute load average before / after: a busy machine makes every figure noisier
    result["load_avg_1m"] = [load_before[0], os.getloadavg()[0]]
    result["summary"] = _summary(result["fp32"])
    if "bf16" in result:
        result["summary_bf16"] = _summary(result["bf16"])
    path = write_json(result, args.out)
    last = result["fp32"][-1]
    print(
        f"wrote {path}: at T={last['tasks']}, skipping old adapters' backward {last['speedup_train']:.2f}x "
        f"({last['train_img_s_sequential']:.1f} vs {last['train_img_s_reference_grad']:.1f} img/s); "
        f"batched experts {last['speedup_eval_batched']:.2f}x eval "
        f"({last['eval_img_s_batched']:.1f} vs {last['eval_img_s_sequential']:.1f} img/s), "
        f"{last['speedup_train_batched']:.2f}x train "
        f"({last['train_img_s_batched']:.1f} vs {last['train_img_s_sequential']:.1f} img/s); "
        f"load average {result['load_avg_1m'][0]:.1f} -> {result['load_avg_1m'][1]:.1f}"
    )
    return 0
