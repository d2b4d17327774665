"""GS-LoRA forgetting-step throughput vs. full fine-tuning with the same loss.

One step = a remaining batch and a forgotten batch through ViT-P8S8 (CosFace), the GS-LoRA
loss (retain CE + beta * bounded forget term + alpha * group lasso), backward, AdamW step.
GS-LoRA trains only the FFN LoRA (r 8); "full" trains every parameter but the head with the
same loss minus the group term (the baselines' setting). Reported: images/s (both batches
counted), the ratio measured in this process, trainable-parameter share, peak memory.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import torch
import torch.nn.functional as F

from genattr.bench.common import device_info, peak_memory_mb, reset_peak, timed, write_json
from genattr.methods.forgetting.base import bounded_forget_loss
from genattr.methods.forgetting.lora import attach_lora, group_tensors, structure_loss
from genattr.models.face_vit import FaceViT

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--img-size", type=int, default=None, help="default: 112 on GPU, 56 on CPU")
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--batch", type=int, default=None, help="per branch; default 48 on GPU, 8 on CPU")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--out", default="bench_results/gslora.json")


def _case(args: argparse.Namespace, device: torch.device, lora: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    net = FaceViT(num_classes=100, img_size=args.img_size, depth=args.depth).to(device)
    total = sum(p.numel() for p in net.parameters())
    if lora:
        module = attach_lora(net, {"r": 8, "lora_alpha": 1})
    else:
        module = net
        for n, p in net.named_parameters():
            p.requires_grad_(not n.startswith("head."))
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)
    g = torch.Generator(device="cpu").manual_seed(1)
    xr = torch.rand(args.batch, 3, args.img_size, args.img_size, generator=g).to(device)
    xf = torch.rand(args.batch, 3, args.img_size, args.img_size, generator=g).to(device)
    yr = torch.randint(0, 80, (args.batch,), generator=g).to(device)
    yf = torch.randint(80, 100, (args.batch,), generator=g).to(device)
    module.train()

    def step() -> None:
        logits_r, _ = module(xr, yr)
        logits_f, _ = module(xf, yf)
        loss = F.cross_entropy(logits_r, yr) + 0.2 * bounded_forget_loss(logits_f, yf, 105.0)
        if lora:
            loss = loss + 1e-4 * structure_loss(group_tensors(module))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    reset_peak(device)
    sec = timed(step, device, warmup=args.warmup, repeats=args.repeats)
    trainable = sum(p.numel() for p in params)
    return {
        "step_seconds": sec,
        "images_per_s": 2 * args.batch / sec,
        "trainable_params": trainable,
        "trainable_share": trainable / total,
        "peak_memory_mb": peak_memory_mb(device),
    }


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    args.img_size = args.img_size or (112 if gpu else 56)
    args.batch = args.batch or (48 if gpu else 8)
    full = _case(args, device, lora=False)
    gs = _case(args, device, lora=True)
    out = {
        "bench": "gslora",
        "setting": {"img_size": args.img_size, "depth": args.depth, "batch_per_branch": args.batch},
        "gslora": gs,
        "full_finetune": full,
        "speedup_images_per_s": gs["images_per_s"] / full["images_per_s"],
        "note": "CPU peak memory is the process RSS high-water mark (full fine-tune runs first).",
        **device_info(device),
    }
    write_json(out, args.out)
    print(
        f"GS-LoRA {gs['images_per_s']:.1f} img/s vs full {full['images_per_s']:.1f} img/s "
        f"(x{out['speedup_images_per_s']:.2f}); trainable {100 * gs['trainable_share']:.2f}% -> {args.out}"
    )
    return 0
