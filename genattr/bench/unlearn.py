"""AbU cost on the MSCOCO twin: seconds per query vs one leave-K-out retrain, Fisher by torch.func vs a loop.

All figures come from one process on the same twin model: the Fisher (per-sample gradients with
``vmap(grad)`` and the same gradients one backward at a time, asserted equal), the loss sweep over the
training set (images/s), one AbU query (unlearning step + sweep), and one coupled retrain from scratch
(the unit cost of the leave-K-out evaluation). The goal of the issue is AbU >= 20x cheaper than a retrain.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from genattr.bench.common import device_info, peak_memory_mb, reset_peak, write_json
from genattr.methods.attribution.losses import loss_sweep, strided_timesteps
from genattr.methods.attribution.training import recipe_from_trainer, train_coupled
from genattr.methods.attribution.unlearning import diagonal_fisher, restore, select_parameters, snapshot, unlearn
from genattr.models.diffusion import build_diffusion, load_unet_weights
from genattr.twins.mscoco import ensure_mscoco_twin

UNET = {
    "sample_size": 8,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 1,
    "block_out_channels": [16, 32],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 16,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
}
#: the twin profile's recipe (conf/data/mscoco.yaml over conf/trainer/diffusion.yaml), every key a recipe reads
TRAINER = {
    "epochs": 100,
    "batch_size": 32,
    "optimizer": {"lr": 4e-3, "weight_decay": 0.0},
    "schedule": {"warmup_steps": 0},
    "ema_decay": 0.99,
    "grad_clip": 0.0,
    "train_seed": 0,
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", default=".cache", help="where the twin is built / found")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--queries", type=int, default=3)
    p.add_argument("--fisher-epochs", type=int, default=1)
    p.add_argument("--out", default="bench_results/unlearn.json")


def _t(fn, device: torch.device) -> tuple[Any, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - t0


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model_cfg = {"unet": UNET, "scheduler": {}, "seed": 0}
    folder = ensure_mscoco_twin(args.cache, model={"unet": UNET, "scheduler": {}, "init_seed": 0}, trainer=TRAINER)
    lat = np.load(folder / "coco17_train_latents.npy")
    txt = np.load(folder / "coco17_train_text_embeddings.npy")
    qlat = np.load(folder / "coco17_sample_latents.npy")
    qtxt = np.load(folder / "coco17_sample_text_embeddings.npy")
    model = build_diffusion(**model_cfg)
    load_unet_weights(model.unet, folder / "model.safetensors")
    model.unet.to(device)
    names = select_parameters(model.unet, "cross_attn_kv")
    res: dict[str, Any] = {"device": device_info(device), "twin": str(folder), "n_train": int(txt.shape[0])}
    reset_peak(device)
    fast, s_fast = _t(
        lambda: diagonal_fisher(model, lat, txt, names, epochs=args.fisher_epochs, batch_size=64, device=device), device
    )
    res["fisher_peak_mb"] = peak_memory_mb(device)
    slow, s_slow = _t(
        lambda: diagonal_fisher(
            model, lat, txt, names, epochs=args.fisher_epochs, batch_size=64, device=device, naive=True
        ),
        device,
    )
    err = max(float((fast[n] - slow[n]).abs().max() / slow[n].abs().max()) for n in names)
    assert err < 1e-3, f"vmap and loop Fishers differ (max relative error {err:.2e})"
    n_grads = args.fisher_epochs * lat.shape[0]
    res["fisher"] = {
        "per_sample_grads": n_grads,
        "vmap_s": s_fast,
        "loop_s": s_slow,
        "speedup": s_slow / s_fast,
        "max_rel_diff": err,
    }
    ts = strided_timesteps(model.num_timesteps, 10)
    before, s_sweep = _t(
        lambda: loss_sweep(model, lat, txt, range(lat.shape[0]), ts, seed=0, batch_size=640, device=device), device
    )
    res["sweep"] = {
        "rows": int(lat.shape[0]),
        "timesteps": len(ts),
        "seconds": s_sweep,
        "images_per_s": lat.shape[0] / s_sweep,
        "forward_passes_per_s": lat.shape[0] * len(ts) / s_sweep,
    }
    per_query = []
    for q in range(min(args.queries, qlat.shape[0])):
        saved = snapshot(model, names)
        x0, cond = torch.from_numpy(qlat[q]).to(device), torch.from_numpy(qtxt[q, 0]).to(device)

        def one() -> None:
            unlearn(model, names, fast, x0, cond, alpha=1e-3, n_train=txt.shape[0], draws=512, batch_size=80, seed=q)  # noqa: B023
            loss_sweep(model, lat, txt, range(lat.shape[0]), ts, seed=0, batch_size=640, device=device)

        _, s = _t(one, device)
        restore(model, saved)
        per_query.append(s)
    amortised = s_fast / max(1, qlat.shape[0])
    res["abu_query_s"] = float(np.median(per_query)) + amortised
    res["abu_query_s_parts"] = {
        "unlearn_plus_sweep_median": float(np.median(per_query)),
        "fisher_amortised_over_queries": amortised,
    }
    reset_peak(device)
    retrain_model = build_diffusion(**model_cfg)
    retrain_model.unet.to(device)
    acc = Accelerator(cpu=device.type == "cpu")  # the retrain trains on the measured device
    _, s_retrain = _t(
        lambda: train_coupled(
            retrain_model, lat, txt, recipe_from_trainer(TRAINER), removed=[0, 1, 2, 3], accelerator=acc
        ),
        device,
    )
    res["retrain_s"] = s_retrain
    res["retrain_peak_mb"] = peak_memory_mb(device)
    res["retrain_over_abu_query"] = s_retrain / res["abu_query_s"]
    res["goal_20x_met"] = bool(res["retrain_over_abu_query"] >= 20)
    path = write_json(res, args.out)
    print(
        f"AbU {res['abu_query_s']:.2f}s/query vs retrain {s_retrain:.1f}s ({res['retrain_over_abu_query']:.1f}x); "
        f"Fisher vmap {s_fast:.2f}s vs loop {s_slow:.2f}s ({s_slow / s_fast:.1f}x); "
        f"sweep {res['sweep']['images_per_s']:.0f} images/s -> {path}"
    )
    return 0
