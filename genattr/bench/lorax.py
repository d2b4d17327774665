"""LoRAX training / evaluation throughput vs. the original all-adapter backward.

For T = 1..N adapters, one training step (forward through every adapter, backward,
AdamW step) is timed for the default path (old adapters under ``no_grad``) and for
``reference_grad=true`` (the original: the graph is kept through every old adapter), on
the same inputs with the same dropout masks; the two losses are asserted equal, so the
speed-up changes nothing in the maths. Evaluation images/s and peak memory are reported
too, and on a GPU the same figures under bf16 autocast.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from typing import Any

import timm
import torch

from genattr.bench.common import device_info, peak_memory_mb, reset_peak, timed, write_json
from genattr.methods.continual.lorax import LoRAXNet

log = logging.getLogger(__name__)
LORA = {"r": 64, "lora_alpha": 16, "lora_dropout": 0.1, "bias": "none"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="convit_tiny", help="timm ConViT name (random init)")
    p.add_argument("--img-size", type=int, default=None, help="default: 224 on GPU, 112 on CPU")
    p.add_argument("--batch", type=int, default=None, help="default: 32 on GPU, 8 on CPU")
    p.add_argument("--tasks", type=int, default=5, help="largest number of adapters T")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--out", default="bench_results/lorax.json")


def _net(args: argparse.Namespace, reference: bool, n_tasks: int, device: torch.device) -> LoRAXNet:
    torch.manual_seed(0)
    backbone = timm.create_model(args.model, pretrained=False, num_classes=0, img_size=args.img_size)
    net = LoRAXNet(backbone, LORA, "gpsa_qk_v", reference, args.model)
    for t in range(n_tasks):
        net.begin_task(t, 2, aux_head=True)
    return net.to(device)


def _step_fn(net: LoRAXNet, x: torch.Tensor, y: torch.Tensor, amp: torch.dtype | None) -> tuple[Any, list[float]]:
    opt = torch.optim.AdamW(net.trainable_parameters(), lr=1e-4)
    losses: list[float] = []

    def step() -> None:
        torch.manual_seed(1234)  # identical dropout masks for both paths
        ctx = torch.autocast(x.device.type, dtype=amp) if amp else contextlib.nullcontext()
        with ctx:
            out = net(x)
            loss = torch.nn.functional.cross_entropy(out["logits"], y)
            if "aux_logits" in out:  # the div head exists from the second task on
                loss = loss + 0.1 * torch.nn.functional.cross_entropy(out["aux_logits"], net.aux_targets(y))
        losses.append(loss.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()

    return step, losses


def _measure(args: argparse.Namespace, device: torch.device, amp: torch.dtype | None) -> list[dict[str, Any]]:
    rows = []
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=g).to(device)
    for n_tasks in range(1, args.tasks + 1):
        y = torch.randint(0, 2 * n_tasks, (args.batch,), generator=g).to(device)
        row: dict[str, Any] = {"tasks": n_tasks}
        first_losses = {}
        for mode, reference in (("default", False), ("reference_grad", True)):
            net = _net(args, reference, n_tasks, device).train()
            step, losses = _step_fn(net, x, y, amp)
            step()  # the comparison step: same weights, same masks
            first_losses[mode] = losses[0]
            reset_peak(device)
            sec = timed(step, device, warmup=args.warmup, repeats=args.repeats)
            row[f"train_img_s_{mode}"] = args.batch / sec
            row[f"train_peak_mem_mb_{mode}"] = peak_memory_mb(device)
            if mode == "default":
                net.eval()

                def infer(net: LoRAXNet = net) -> None:
                    ctx = torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()
                    with torch.no_grad(), ctx:
                        net(x)

                reset_peak(device)
                row["eval_img_s"] = args.batch / timed(infer, device, warmup=args.warmup, repeats=args.repeats)
                row["eval_peak_mem_mb"] = peak_memory_mb(device)
            del net
        tol = 1e-2 if amp else 1e-5
        if abs(first_losses["default"] - first_losses["reference_grad"]) > tol * max(1.0, abs(first_losses["default"])):
            raise AssertionError(f"T={n_tasks}: losses differ {first_losses}")
        row["loss_default"], row["loss_reference_grad"] = first_losses["default"], first_losses["reference_grad"]
        row["speedup_train"] = row["train_img_s_default"] / row["train_img_s_reference_grad"]
        log.info("T=%d: %s", n_tasks, {k: round(v, 3) for k, v in row.items()})
        rows.append(row)
    return rows


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.img_size = args.img_size or (224 if device.type == "cuda" else 112)
    args.batch = args.batch or (32 if device.type == "cuda" else 8)
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
    last = result["fp32"][-1]
    result["summary"] = {
        f"speedup_train_T{last['tasks']}": last["speedup_train"],
        "goal": ">= 2x at T = 5",
    }
    path = write_json(result, args.out)
    print(
        f"wrote {path}: train speed-up at T={last['tasks']} = {last['speedup_train']:.2f}x "
        f"({last['train_img_s_default']:.1f} vs {last['train_img_s_reference_grad']:.1f} img/s)"
    )
    return 0
