"""``make gpu-check``: the first call on a GPU machine, in one go (about 8 minutes on one H100 with start-up).

Why one script: a lent GPU is a scarce few minutes, so everything the paper configurations need to know about a
card is measured in a single call and written down (``bench_results/gpu.json``, and the README table it prints):

* throughput and model FLOP utilisation of the two heaviest trainings, at the paper's batch, image size and
  precision: ConViT-B + LoRA r64 (LoRAX, fp16, batch 32, 224) and CLIP ViT-L/14 fine-tuned end to end (AI-GenBench
  tune, bf16, batch 16 per process, 224). Images/s come from timed optimiser steps after warm-up; the FLOPs of one
  step from ``torch.utils.flop_counter`` (matmuls and convolutions, forward + backward), so MFU = FLOPs/s over the
  card's dense bf16 peak (:data:`PEAK_BF16_TFLOPS`, or ``--peak-tflops``);
* LoRAX evaluation at T = 5 experts, batched (one pass over the shared frozen weights) against sequential: the
  images/s of each and their ratio (issue goal: >= 1.5x on a GPU);
* every paper preset (``conf/experiment``) end to end for ``--steps`` optimiser steps a stage on the GPU in its own
  precision, on its twin at the real image size (the overrides of :mod:`genattr.smoke`): seconds, peak GPU memory
  (``results.json`` ``peak_gpu_memory_gb``) and whether every loss stayed finite.

``--plan`` prints what would run and exits (no GPU needed); without a CUDA device the script says so and exits 2.
The whole call keeps to ``--budget-s``: presets that would start after it are reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from genattr import smoke

#: dense bf16 tensor-core peak of a card (TFLOP/s, no sparsity), matched on the CUDA device name; the first match
#: wins, so the PCIe H100 comes before the SXM one
PEAK_BF16_TFLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H100", "PCIE"), 756.0),
    (("H200",), 989.4),
    (("H100",), 989.4),
    (("A100",), 312.0),
)

#: what every preset gets on the GPU on top of :data:`genattr.smoke.SMOKE` (its own precision stays)
GPU_COMMON = ("trainer.cpu=false", "trainer.num_workers=2", "tracking=none")


def peak_tflops(device_name: str) -> float | None:
    """The card's dense bf16 peak from its name, or ``None`` when it is not in :data:`PEAK_BF16_TFLOPS`."""
    upper = device_name.upper()
    for keys, peak in PEAK_BF16_TFLOPS:
        if all(k in upper for k in keys):
            return peak
    return None


def step_flops(step: Callable[[], Any]) -> float:
    """FLOPs of one call of ``step`` (forward + backward) as ``torch.utils.flop_counter`` counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def measure(
    step: Callable[[], float],
    *,
    images_per_step: int,
    device: torch.device,
    warmup: int,
    steps: int,
    peak: float | None,
) -> dict[str, Any]:
    """Images/s, FLOPs per image, MFU against ``peak`` TFLOP/s, peak memory and the last loss of ``step``."""
    flops = step_flops(step)
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0, loss = time.perf_counter(), float("nan")
    for _ in range(steps):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - t0) / steps
    achieved = flops / seconds
    return {
        "images_per_s": round(images_per_step / seconds, 2),
        "step_ms": round(1000 * seconds, 2),
        "gflops_per_image": round(flops / images_per_step / 1e9, 2),
        "achieved_tflops": round(achieved / 1e12, 3),
        "mfu": None if peak is None else round(achieved / (peak * 1e12), 4),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "loss": loss,
        "loss_finite": math.isfinite(loss),
    }


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def train_step(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable[[Any, torch.Tensor], torch.Tensor], amp: Any
) -> Callable[[], float]:
    """A full optimiser step (forward under autocast, backward, AdamW) of ``model``'s trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step() -> float:
        model.train()
        with _autocast(x.device, amp):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def lorax_net(name: str, img_size: int, tasks: int, experts: str) -> nn.Module:
    """LoRAX's network as the preset builds it (r 64, alpha 16, GPSA qk+v) with ``tasks`` adapters, random init."""
    import timm

    from genattr.methods.continual.lorax import LoRAXNet

    torch.manual_seed(0)
    backbone = timm.create_model(name, pretrained=False, num_classes=0, img_size=img_size)
    lora = {"r": 64, "lora_alpha": 16, "lora_dropout": 0.1, "bias": "none"}
    net = LoRAXNet(backbone, lora, "gpsa_qk_v", False, name, experts=experts)
    for t in range(tasks):
        net.begin_task(t, 2, aux_head=True)
    return net


def detector_net(name: str, input_size: int) -> nn.Module:
    """The AI-GenBench tune detector as ``conf/model/clip_vitl14_tune.yaml`` builds it, random weights."""
    from genattr.models.detectors import build_detector

    kwargs = {} if name.startswith("open_clip:") else {"img_size": input_size}  # open_clip takes input_size
    return build_detector(
        name=name,
        pretrained=False,
        input_size=input_size,
        kwargs=kwargs,
        features="embedding",
        normalize_features=True,
    )


def throughput(device: torch.device, *, scale: float, steps: int, warmup: int, peak: float | None) -> dict[str, Any]:
    """The two MFU figures and LoRAX's batched-vs-sequential evaluation at T = 5. ``scale`` < 1 shrinks the
    models' inputs and batches for the CPU test of this code (never for a figure)."""
    side = max(32, int(224 * scale) // 16 * 16)
    out: dict[str, Any] = {}
    # LoRAX on ConViT-B: the preset's fp16 (GradScaler aside, the same kernels)
    amp = torch.float16 if device.type == "cuda" else None
    batch = max(2, int(32 * scale))
    g = torch.Generator().manual_seed(0)
    net = lorax_net("convit_base" if scale >= 1 else "convit_tiny", side, 1, "batched").to(device)
    x = torch.randn(batch, 3, side, side, generator=g).to(device)
    y = torch.randint(0, 2, (batch,), generator=g).to(device)
    step = train_step(net, x, y, lambda o, t: nn.functional.cross_entropy(o["logits"].float(), t), amp)
    out["lorax_convit_base_train"] = {
        "batch": batch,
        "img_size": side,
        "precision": "fp16" if amp else "fp32",
        **measure(step, images_per_step=batch, device=device, warmup=warmup, steps=steps, peak=peak),
    }
    del net, step
    evals: dict[str, float] = {}
    for experts in ("sequential", "batched"):
        net = lorax_net("convit_base" if scale >= 1 else "convit_tiny", side, 5, experts).to(device).eval()

        def infer(net: nn.Module = net) -> float:
            with torch.no_grad(), _autocast(device, amp):
                return float(net(x)["logits"].float().sum())

        evals[experts] = measure(infer, images_per_step=batch, device=device, warmup=warmup, steps=steps, peak=peak)[
            "images_per_s"
        ]
        del net
    out["lorax_eval_T5"] = {
        **{f"{k}_images_per_s": v for k, v in evals.items()},
        "batched_over_sequential": round(evals["batched"] / evals["sequential"], 3),
    }
    # the detector, ViT-L/14 CLIP tune in bf16
    amp = torch.bfloat16 if device.type == "cuda" else None
    batch = max(2, int(16 * scale))
    name = "open_clip:ViT-L-14.commonpool_xl_s13b_b90k_tune"
    det = detector_net(name if scale >= 1 else "vit_tiny_patch16_224_tune", side).to(device)
    xd = torch.randn(batch, 3, side, side, generator=g).to(device)
    yd = torch.randint(0, 2, (batch,), generator=g).float().to(device)
    step = train_step(
        det, xd, yd, lambda o, t: nn.functional.binary_cross_entropy_with_logits(o.float().view(-1), t), amp
    )
    out["detector_clip_vitl14_tune_train"] = {
        "batch": batch,
        "img_size": side,
        "precision": "bf16" if amp else "fp32",
        **measure(step, images_per_step=batch, device=device, warmup=warmup, steps=steps, peak=peak),
    }
    return out


def preset_command(preset: str, out: Path, *, steps: int, cache_dir: Path) -> list[str]:
    """``launch.py`` for one preset on the GPU: the smoke overrides without the CPU ones, its own precision."""
    cpu = smoke.command(preset, out, steps=steps, cache_dir=cache_dir)
    # every stage on a GPU: the CPU runs' stop_after_task is dropped
    kept = [a for a in cpu if a not in smoke.COMMON and not a.startswith("stop_after_task=")]
    return kept + list(GPU_COMMON)


def plan(names: Sequence[str], steps: int, out: Path, cache_dir: Path) -> dict[str, Any]:
    """What one call runs, in order (``--plan``)."""
    return {
        "throughput": ["lorax_convit_base_train", "lorax_eval_T5", "detector_clip_vitl14_tune_train"],
        "presets": {n: preset_command(n, out, steps=steps, cache_dir=cache_dir)[2:] for n in names},
        "not_covered": dict(smoke.NOT_COVERED),
    }


def run_presets(names: Sequence[str], out: Path, *, steps: int, cache_dir: Path, deadline: float) -> list[dict]:
    rows = []
    for name in names:
        left = deadline - time.perf_counter()
        if left < 20:
            rows.append({"preset": name, "passed": False, "note": "skipped: --budget-s spent"})
            continue
        result = smoke.run_one(name, out, steps=steps, cache_dir=cache_dir, timeout=left, cmd=preset_command)
        rows.append(
            {
                "preset": name,
                "seconds": result.seconds,
                "passed": result.passed,
                "note": result.note,
                "peak_gpu_memory_gb": result.peak_gpu_memory_gb,
            }
        )
        print(f"  {name}: {'pass' if result.passed else 'FAIL ' + result.note} in {result.seconds:.0f} s", flush=True)
    return rows


def markdown(report: dict[str, Any]) -> str:
    """The README's GPU table from a ``gpu.json`` report."""
    lines = [f"Card: {report['device']} (bf16 peak {report['peak_bf16_tflops']} TFLOP/s)", ""]
    lines += [
        "| training | batch | precision | images/s | MFU | peak memory | loss finite |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, label in (
        ("lorax_convit_base_train", "LoRAX ConViT-B r64"),
        ("detector_clip_vitl14_tune_train", "detector ViT-L/14 tune"),
    ):
        r = report["throughput"][key]
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %"
        mem = "n/a" if r["peak_memory_gb"] is None else f"{r['peak_memory_gb']} GB"
        lines.append(
            f"| {label} | {r['batch']} | {r['precision']} | {r['images_per_s']} | {mfu} | {mem} | {r['loss_finite']} |"
        )
    ev = report["throughput"]["lorax_eval_T5"]
    lines += [
        "",
        f"LoRAX evaluation at T = 5: batched {ev['batched_images_per_s']} images/s, sequential "
        f"{ev['sequential_images_per_s']} images/s ({ev['batched_over_sequential']}x).",
        "",
        "| preset | seconds | peak GPU memory | result |",
        "|---|---|---|---|",
    ]
    for row in report["presets"]:
        mem = row.get("peak_gpu_memory_gb")
        verdict = "pass" if row["passed"] else f"FAIL ({row['note']})"
        lines.append(
            f"| {row['preset']} | {row.get('seconds', '-')} | {'-' if mem is None else f'{mem} GB'} | {verdict} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m genattr.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated presets (default: all)")
    parser.add_argument("--steps", type=int, default=3, help="trainer.max_steps of each preset")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting presets after this")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak (TFLOP/s)")
    parser.add_argument("--workdir", default=".cache/gpu_check")
    parser.add_argument("--out", default="bench_results/gpu.json")
    parser.add_argument("--plan", action="store_true", help="print what would run and exit")
    args = parser.parse_args(argv)
    t_start = time.perf_counter()
    names = [n for n in args.only.split(",") if n] or [n for n in smoke.presets() if n in smoke.SMOKE]
    unknown = [n for n in names if n not in smoke.SMOKE]
    if unknown:
        parser.error(f"no smoke overrides for {unknown} (genattr/smoke.py SMOKE; not covered: {smoke.NOT_COVERED})")
    work = (smoke.ROOT / args.workdir).resolve()
    out, cache = work / time.strftime("%Y%m%d-%H%M%S"), work / "cache"
    if args.plan:
        print(json.dumps(plan(names, args.steps, out, cache), indent=2))
        return 0
    if not torch.cuda.is_available():
        print(
            "gpu-check needs a CUDA GPU and this machine has none (python -m genattr.gpu_check --plan shows "
            "what it would run)",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    peak = args.peak_tflops or peak_tflops(name)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "device": name,
        "peak_bf16_tflops": peak,
        "torch": torch.__version__,
        "not_covered": dict(smoke.NOT_COVERED),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    print(f"gpu-check on {name} (bf16 peak {peak} TFLOP/s)", flush=True)
    report["throughput"] = throughput(device, scale=1.0, steps=10, warmup=3, peak=peak)
    torch.cuda.empty_cache()
    print(json.dumps(report["throughput"], indent=2), flush=True)
    deadline = t_start + args.budget_s
    report["presets"] = run_presets(names, out, steps=args.steps, cache_dir=cache, deadline=deadline)
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    target = smoke.ROOT / args.out
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(report, indent=2))
    print(markdown(report))
    print(f"written: {target}")
    return 0 if all(r["passed"] for r in report["presets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
