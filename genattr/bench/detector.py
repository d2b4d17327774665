"""AI-GenBench detector throughput: the mandatory eval pipeline, probe vs tune steps, loader vs model.

Figures, all measured in one process: images/s of the mandatory evaluation chain on
camera-sized images (it runs on every validation image after every window); training
images/s of one optimizer step in ``_probe`` and ``_tune`` mode on the same backbone and
inputs (their ratio is the probe speed-up); images/s of the training data path (fixed
baseline augmentation + rot90/flip + resize + normalise, through a DataLoader with
``--workers`` processes) against the tune step, whose ratio must stay above 1 for the
loader not to be the bottleneck; peak memory.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from genattr.bench.common import device_info, peak_memory_mb, reset_peak, timed, write_json
from genattr.data.aigenbench.augment import baseline_train_pipeline, mandatory_eval_pipeline, random_part
from genattr.data.aigenbench.crops import to_model_input, train_crop
from genattr.models.detectors import build_detector

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="resnet50", help="timm name (random init), probe and tune are both timed")
    p.add_argument("--img-size", type=int, default=224, help="model input side")
    p.add_argument("--batch", type=int, default=None, help="default: 64 on GPU, 8 on CPU")
    p.add_argument("--source-size", type=int, nargs=2, default=(768, 576), help="W H of the benchmark images")
    p.add_argument("--images", type=int, default=64, help="images through the eval pipeline / the loader")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for the loader figure")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--out", default="bench_results/detector.json")


def _photo(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A smooth random image of camera size (noise alone would make JPEG unrealistically slow)."""
    small = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)


class _Photos(torch.utils.data.Dataset):
    def __init__(self, n: int, size: tuple[int, int], img_size: int) -> None:
        self.n, self.size, self.img_size = n, size, img_size
        self.pipeline = baseline_train_pipeline()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, float]:
        rng = np.random.default_rng(i)
        img = self.pipeline(_photo(rng, *self.size), rng)
        return to_model_input(train_crop(random_part(img, rng), "resize", self.img_size, rng)), float(i % 2)


def _step_ips(name: str, x: torch.Tensor, y: torch.Tensor, device: torch.device, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    det = build_detector(name=name, pretrained=False, kwargs={}).to(device).train()
    params = [p for p in det.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)

    def step() -> None:
        loss = torch.nn.functional.binary_cross_entropy_with_logits(det(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    reset_peak(device)
    sec = timed(step, device, warmup=1, repeats=repeats)
    return {
        "images_per_s": len(x) / sec,
        "trainable_params": sum(p.numel() for p in params),
        "peak_memory_mb": peak_memory_mb(device),
    }


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch = args.batch or (64 if device.type == "cuda" else 8)
    rng = np.random.default_rng(0)
    w, h = args.source_size
    photos = [_photo(rng, w, h) for _ in range(args.images)]
    pipe = mandatory_eval_pipeline()
    t0 = time.perf_counter()
    for i, img in enumerate(photos):
        pipe(img, np.random.default_rng(4321 + i))
    eval_ips = len(photos) / (time.perf_counter() - t0)

    x = torch.randn(batch, 3, args.img_size, args.img_size, device=device)
    y = (torch.arange(batch, device=device) % 2).float()
    probe = _step_ips(f"{args.model}_probe", x, y, device, args.repeats)
    tune = _step_ips(f"{args.model}_tune", x, y, device, args.repeats)

    loader = DataLoader(_Photos(args.images, (w, h), args.img_size), batch_size=batch, num_workers=args.workers)
    t0 = time.perf_counter()
    n = sum(len(xb) for xb, _ in loader)
    loader_ips = n / (time.perf_counter() - t0)

    result = {
        "benchmark": "detector",
        "model": args.model,
        "img_size": args.img_size,
        "batch": batch,
        "source_size": [w, h],
        **device_info(device),
        "eval_pipeline_images_per_s": eval_ips,
        "probe_step": probe,
        "tune_step": tune,
        "probe_speedup_over_tune": probe["images_per_s"] / tune["images_per_s"],
        "train_loader_images_per_s": loader_ips,
        "train_loader_workers": args.workers,
        "loader_over_tune_step": loader_ips / tune["images_per_s"],
        "loader_is_bottleneck": loader_ips < tune["images_per_s"],
    }
    path = write_json(result, args.out)
    print(
        f"eval pipeline {eval_ips:.1f} img/s | probe {probe['images_per_s']:.1f} img/s, tune "
        f"{tune['images_per_s']:.1f} img/s (probe {result['probe_speedup_over_tune']:.2f}x) | loader "
        f"{loader_ips:.1f} img/s with {args.workers} workers = {result['loader_over_tune_step']:.2f}x the tune step"
    )
    print(f"written: {path}")
    return 0
