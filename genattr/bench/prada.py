"""Model-tracer throughput: Stage 1 images/s (greedy vs Algorithm 3, batched vs one image) and Stage 2 scoring.

All figures come from one process on the same randomly initialised models (weights do not change the cost):
``--scale real`` builds the released architectures (VAR vae_ch160v4096z32 + VAR-d16, MaskGIT-VQGAN + RAR-B) at
256×256; ``--scale twin`` the twin's tiny configs at 32×32 (CPU-sized). Stage 1 = every signal of one image
(encode, quantise, three decodes, one re-encode); Stage 2 = teacher-forced ℓ_c, ℓ_u and guided log-likelihood
of one image under one variant for one candidate class (multiply by 4 variants × K' classes per family).
Sampling (how fast ``pairs.source=generate`` makes inverse-decoder pairs) is timed with the KV cache and with
the prefix recomputed every step; both draw the same tokens.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from genattr.bench.common import device_info, peak_memory_mb, reset_peak, timed, write_json
from genattr.methods.tracing.likelihood import token_loglik
from genattr.methods.tracing.signals import QuantizerSpec, signals_batch
from genattr.models.autoregressive.rar import RARGenerator
from genattr.models.autoregressive.var import VARGenerator
from genattr.models.tokenizers.multi_scale import MultiScaleVQ
from genattr.models.tokenizers.optimized_quant import alg3_rounds
from genattr.models.tokenizers.single_scale import SingleScaleVQ


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--scale", choices=["real", "twin", "auto"], default="auto", help="auto: real on CUDA, else twin")
    p.add_argument("--batch-size", type=int, default=None, help="default: 16 real, 64 twin")
    p.add_argument("--alg3-iters", type=int, default=200, help="Adam steps per round (official: 200)")
    p.add_argument("--alg3-keep-best", action="store_true", help="keep the best argmax seen (genattr flag, off)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sample-batch", type=int, default=8, help="images per sampling call (CFG doubles the batch)")
    p.add_argument("--out", default="bench_results/prada.json")


def _models(scale: str) -> tuple[dict[str, Any], int]:
    if scale == "real":
        var_tok, rar_tok = MultiScaleVQ(), SingleScaleVQ()
        var_gen, rar_gen = VARGenerator(depth=16), RARGenerator()
        return {"var": (var_tok, var_gen), "rar": (rar_tok, rar_gen)}, 256
    from genattr.twins.rarvar import twin_models

    cfg = twin_models(32, 10)
    from genattr.models.autoregressive.family import build_model

    out = {}
    for fam, label in (("var", "var30"), ("rar", "rarxxl")):
        out[fam] = (build_model(cfg[fam]["tokenizer"]), build_model(cfg[fam]["variants"][label]["generator"]))
    return out, 32


def _stage1(tok, images, spec: QuantizerSpec, device, repeats: int) -> dict[str, float]:
    quantize = spec.quantizer(tok)
    reset_peak(device)
    sec = timed(lambda: signals_batch(tok, images, quantize), device, warmup=1, repeats=repeats)
    return {"images_per_s": len(images) / sec, "seconds_per_batch": sec, "peak_mb": peak_memory_mb(device)}


def _sampling(gen, labels: torch.Tensor, device: torch.device, repeats: int) -> dict[str, Any]:
    """Images/s of ``gen.sample`` with and without the KV cache, same labels and seed."""
    out: dict[str, Any] = {"batch": len(labels)}
    for name, cached in (("kv_cache", True), ("recompute", False)):
        reset_peak(device)

        def run(cached: bool = cached) -> torch.Tensor:
            return gen.sample(labels, torch.Generator(device=device).manual_seed(0), kv_cache=cached)

        sec = timed(run, device, warmup=1, repeats=repeats)
        out[name] = {"images_per_s": len(labels) / sec, "peak_mb": peak_memory_mb(device)}
    out["kv_cache_speedup"] = out["kv_cache"]["images_per_s"] / out["recompute"]["images_per_s"]
    return out


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    scale = args.scale if args.scale != "auto" else ("real" if device.type == "cuda" else "twin")
    bs = args.batch_size or (16 if scale == "real" else 64)
    iters = args.alg3_iters
    models, size = _models(scale)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(bs, 3, size, size, generator=g).to(device)
    res: dict[str, Any] = {"device": device_info(device), "scale": scale, "image_size": size, "batch_size": bs}
    for fam, (tok, gen) in models.items():
        tok.to(device).eval().requires_grad_(False)
        if hasattr(gen, "attach_tokenizer"):
            gen.attach_tokenizer(tok)
        gen.to(device).eval().requires_grad_(False)
        fam_res: dict[str, Any] = {"num_tokens": int(tok.num_tokens)}
        greedy = QuantizerSpec(optimized=False)
        fam_res["stage1_greedy"] = _stage1(tok, images, greedy, device, args.repeats)
        fam_res["stage1_greedy_batch1"] = _stage1(tok, images[:1], greedy, device, args.repeats)
        fam_res["stage1_greedy_batched_speedup"] = (
            fam_res["stage1_greedy"]["images_per_s"] / fam_res["stage1_greedy_batch1"]["images_per_s"]
        )
        if fam == "var":
            # the official schedule (keep_best off); the twin's 4 scales stop at 1 (rounds fix_scale 4, 3, 2)
            opts = {"rounds_stop_scale": 4 if scale == "real" else 1, "iters": iters, "keep_best": args.alg3_keep_best}
            rounds = len(alg3_rounds(len(tok.patch_nums), opts["rounds_stop_scale"]))
            fam_res["alg3"] = {**opts, "rounds": rounds, "adam_steps": rounds * iters}
            fam_res["stage1_alg3"] = _stage1(tok, images, QuantizerSpec(True, opts), device, max(1, args.repeats - 1))
            fam_res["alg3_over_greedy_time"] = (
                fam_res["stage1_greedy"]["images_per_s"] / fam_res["stage1_alg3"]["images_per_s"]
            )
        tokens = torch.randint(0, tok.vocab_size, (bs, tok.num_tokens), generator=g).to(device)
        labels = torch.randint(0, gen.num_classes, (bs,), generator=g).to(device)
        reset_peak(device)
        sec = timed(lambda gen=gen, t=tokens, y=labels: token_loglik(gen, t, y), device, warmup=1, repeats=args.repeats)
        fam_res["stage2_scoring"] = {
            "generator": type(gen).__name__,
            "params_m": sum(p.numel() for p in gen.parameters()) / 1e6,
            "images_per_s_per_variant_per_class": bs / sec,
            "peak_mb": peak_memory_mb(device),
        }
        fam_res["sampling"] = _sampling(gen, labels[: args.sample_batch], device, max(1, args.repeats - 1))
        res[fam] = fam_res
        tok.cpu(), gen.cpu()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    path = write_json(res, args.out)
    print(path.read_text())
    return 0
