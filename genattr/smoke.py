"""``make smoke-paper``: the paper presets (``conf/experiment/*.yaml``) run end to end at the paper's model and
image size, for ``trainer.max_steps`` optimiser steps a stage, on this machine's CPU.

Why: a preset is what a researcher submits to a cluster queue. Shape, memory, dtype and config bugs of the
full-size models (ConViT-B at 224, ViT-L/14, ViT-P8S8 at 112, ViT-B/16, the MSCOCO UNet with SD-2's VAE) would
otherwise surface hours into that queue; here they surface in minutes, in CI. Each preset runs as a user runs it
(``launch.py experiment=<preset>`` in a child process) with only what a CPU needs on top: its twin written at the
real image size, or release-format data generated at the preset's sizes (:data:`DATA`), a handful of images,
random weights where the released ones are not on disk (``model.pretrained=false``, or a random file in the
release's layout: :data:`WEIGHTS`), fp32, small batches, and ``trainer.max_steps`` (every training stops after
that many optimiser steps; evaluation, checkpoints and reports run in full). What each preset gets on top is
:data:`SMOKE`, the only place it is written; :data:`NOT_COVERED` says which presets no CPU can run, and why.

``python -m genattr.smoke [--only a,b] [--jobs N]`` prints preset -> seconds -> peak RSS -> pass/fail and writes
``bench_results/smoke_paper.json``; it exits non-zero when a preset fails (its log is named).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "conf" / "experiment"

#: what every smoke run gets: the step cap, the CPU, fp32, no worker processes, no tracking server
COMMON = (
    "trainer.cpu=true",
    "trainer.mixed_precision=no",
    "trainer.num_workers=0",
    "tracking=none",
)

_CDDB = (
    "model.pretrained=false",
    "data.twin.image_size=256",  # CDDB's images are 256 px; the preset crops 224
    "data.twin.n_train=6",  # the twin's minimum: one image per class in every sub-category folder
    "data.twin.n_val=6",
    "trainer.batch_size=4",
    "trainer.eval_batch_size=12",
    "method.memory.size=10",
)
#: LoRAX evaluates every seen task with every adapter, T^2 ConViT-B passes per image: at 224 px on 2 CPU cores the
#: 12 tasks of CDDB long would take hours, so the CPU run stops after its third task (all stages in gpu-check)
_FIRST_THREE = ("stop_after_task=2",)
_AIGENBENCH = (
    "model.pretrained=false",
    "data.twin.image_size=256",
    "data.twin.n_windows=2",  # 2 sliding windows of the preset's 4 generators each
    "data.twin.n_train=4",
    "data.twin.n_val=1",
    "trainer.global_batch_size=4",  # 2 micro-batches of 2: the accumulation path runs
    "trainer.batch_size=2",
    "trainer.eval_batch_size=8",
    "method.augmentation_factor=1",
)

_CASIA = (
    "data.twin.n_classes=100",  # the scenario's 80 + 4 x 20 classes
    "data.twin.n_train=10",
    "data.twin.n_test=1",
    "data.twin.image_size=112",  # CASIA-WebFace's aligned faces
    "trainer.batch_size=8",
    "trainer.eval_batch_size=50",
)
_IMAGENET100 = (
    "data.twin.n_classes=100",
    "data.twin.n_train=20",  # data_ratio 0.05: one image per class per task
    "data.twin.n_test=1",
    "data.twin.image_size=256",  # resized to 256, centre-cropped to 224 as the preset says
    "trainer.batch_size=8",
    "trainer.eval_batch_size=50",
    "stop_after_task=0",  # ViT-B/16 over 100 test images, evaluated often: the first of four tasks on CPU
)
#: AbU on generated release-format data (:func:`release_mscoco`: 4 images, 2 queries) with random feature towers.
#: The counts that multiply full-size UNet passes are cut to a few: one Fisher pass, 2 micro-batches of 8 draws, 2
#: timesteps per loss, 2 regeneration steps. The leave-K-out retrains train here (2 steps each) instead of being
#: planned for SLURM, for the first query and AbU's removal plus one random removal: every method's retrain is
#: the same code with another removed set.
_MSCOCO = (
    "method.features.clip.pretrained=false",
    "method.features.dino.pretrained=false",
    "method.features.clip_text.pretrained=false",
    "method.fisher.epochs=1",
    "method.unlearn.draws=16",
    "method.unlearn.batch_size=8",
    "method.sweep.time_samples=2",
    "trainer.batch_size=4",
    "method.evaluation.retrains=inline",
    "method.evaluation.ks=[1]",
    "method.evaluation.methods=[unlearn]",
    "method.evaluation.max_queries=1",
    "method.evaluation.random_seeds=1",
    "method.evaluation.loss_time_samples=2",
    "method.evaluation.regen.steps=2",
    "method.recall_ks=[2]",
)

#: preset -> the overrides a CPU smoke run adds (twin at the real image size, few images, small batches, random
#: weights); the step cap and :data:`COMMON` come on top
SMOKE: dict[str, tuple[str, ...]] = {
    "lorax_cddb_easy": _CDDB + _FIRST_THREE,
    "lorax_cddb_hard": _CDDB + _FIRST_THREE,
    "lorax_cddb_long": _CDDB + _FIRST_THREE,
    "detector_dinov2_probe": _AIGENBENCH,
    "detector_dinov2_tune": _AIGENBENCH,
    "detector_clip_probe": _AIGENBENCH,
    "detector_clip_tune": _AIGENBENCH,
    "gslora_casia100": _CASIA,
    "gslora_pp_casia100": _CASIA,
    "gslora_imagenet100": _IMAGENET100,
    "gslora_pp_imagenet100": _IMAGENET100,
    "unlearn_mscoco": _MSCOCO,
}

_TRACER = (
    "the task reads all four released variants of both families from local files: 7.1 B parameters (28 GB of random "
    "checkpoints to write) and, for VAR-d30 alone, ~2.7 TFLOP per 256-px likelihood pass; their full-size modules "
    "are built on the meta device against the published sizes (tests/models/test_prada_models.py)"
)
#: presets no CPU smoke run covers yet, and why (listed in the table as not covered, never as passed)
NOT_COVERED: dict[str, str] = {
    "prada_one_step_rarvar": _TRACER,
    "prada_two_stage_rarvar": _TRACER,
}


def random_face_vit() -> Any:
    """CASIA's ViT-P8S8 with a 100-way CosFace head at random init, saved for ``model.weights`` (the forgetting
    presets start from a pre-trained backbone; its release is not on this machine)."""
    return _preset_model("gslora_casia100", 100)


def random_torchvision_vit_b16() -> Any:
    """torchvision's ``vit_b_16`` at random init, saved in its release layout (``vit_b_16-c867db91.pth``'s keys),
    so the smoke run loads it the way it loads the paper's file."""
    import torchvision

    return torchvision.models.vit_b_16(weights=None)


def _preset_model_cfg(preset: str) -> dict[str, Any]:
    """The preset's composed, resolved ``model`` group (Hydra's compose API is process-global: callers hold
    :data:`_WRITING`)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from genattr.config import register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={preset}"])
    return OmegaConf.to_container(cfg.model, resolve=True)


def _preset_model(preset: str, num_classes: int) -> Any:
    from omegaconf import OmegaConf

    from genattr.methods.forgetting.pretrain import NON_ARCH_KEYS
    from genattr.utils.instantiate import build

    model = _preset_model_cfg(preset)
    return build(OmegaConf.create({k: v for k, v in model.items() if k not in NON_ARCH_KEYS}), num_classes=num_classes)


#: the AbU MSCOCO release's fixed shapes: CLIP's 77 text positions, COCO's 5 captions per training image
_TEXT_TOKENS, _CAPTIONS = 77, 5
#: Stable Diffusion 2's VAE (``stabilityai/stable-diffusion-2`` ``vae/config.json``), which wrote the release's latents
SD2_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=768,
    scaling_factor=0.18215,
)


def release_mscoco(folder: Path, *, n_train: int = 4, n_queries: int = 2) -> None:
    """An AbU MSCOCO release folder (:mod:`genattr.data.mscoco`'s layout) at the preset's sizes, random content:
    latents at the preset UNet's channels and sample size, 77 x ``cross_attention_dim`` text states (5 captions a
    training image), the empty prompt's states, captions files, the preset's UNet at random init
    (``model.safetensors``) and Stable Diffusion 2's VAE at random init (``vae/``, for ``data.vae``). The twin
    cannot stand in: it is pixel-space with 3 channels, and the release's path (latents decoded by a VAE) is
    what a researcher runs."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    from genattr.models.diffusion import build_diffusion, diffusion_kwargs

    model = _preset_model_cfg("unlearn_mscoco")
    unet = model["unet"]
    channels, size, dim = int(unet["in_channels"]), int(unet["sample_size"]), int(unet["cross_attention_dim"])
    rng = np.random.default_rng(0)
    latents = rng.normal(size=(n_train, channels, size, size)).astype(np.float32)
    text = rng.normal(size=(n_train, _CAPTIONS, _TEXT_TOKENS, dim)).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "coco17_train_latents.npy", np.concatenate([latents, latents[..., ::-1]]))  # N, then flipped
    np.save(folder / "coco17_train_text_embeddings.npy", text)
    query = rng.normal(size=(n_queries, channels, size, size)).astype(np.float32)
    np.save(folder / "coco17_sample_latents.npy", query)
    np.save(
        folder / "coco17_sample_text_embeddings.npy",
        rng.normal(size=(n_queries, 1, _TEXT_TOKENS, dim)).astype(np.float32),
    )
    np.save(folder / "null_text_embedding.npy", rng.normal(size=(1, _TEXT_TOKENS, dim)).astype(np.float32))
    (folder / "train_captions.txt").write_text("".join(f"a photo of object {i}\n" for i in range(n_train)))
    (folder / "sample_caption.txt").write_text("".join(f"a picture of thing {i}\n" for i in range(n_queries)))
    state = build_diffusion(**diffusion_kwargs(model)).unet.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    torch.manual_seed(0)
    AutoencoderKL(**SD2_VAE).save_pretrained(str(folder / "vae"))


def data_folder(preset: str, cache_dir: Path) -> Path:
    """Where the generated data of ``preset`` (:data:`DATA`) lives; :func:`run_one` writes it once."""
    return cache_dir / "data" / DATA[preset][0]


def weights_file(preset: str, cache_dir: Path) -> Path:
    """Where the random weights of ``preset`` (:data:`WEIGHTS`) live; :func:`run_one` writes them once."""
    return cache_dir / "weights" / WEIGHTS[preset][0]


def _once(path: Path, write: Callable[[Path], None]) -> Path:
    """``path`` (a file or a folder), written once: ``write`` fills a temporary sibling, which is renamed into place
    (removed if ``write`` fails). One writer at a time: presets that share a file run side by side, and Hydra's
    compose API is process-global."""
    import shutil

    with _WRITING:
        if path.exists():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            write(tmp)
            tmp.replace(path)
        finally:  # gone after the rename; left over after a failed write
            if tmp.is_dir():
                shutil.rmtree(tmp)
            else:
                tmp.unlink(missing_ok=True)
    return path


def _written(path: Path, make: Callable[[], Any]) -> Path:
    """``path``: the state dict of the module ``make`` returns (seed 0), in the format its suffix names, written
    once (:func:`_once`)."""

    def write(tmp: Path) -> None:
        import torch
        from safetensors.torch import save_file

        torch.manual_seed(0)
        state = {k: v.contiguous() for k, v in make().state_dict().items()}
        if path.suffix == ".safetensors":
            save_file(state, str(tmp))
        else:
            torch.save(state, tmp)

    return _once(path, write)


_WRITING = threading.Lock()

#: presets whose run needs a weights file that is not on this machine: a random one in the release's layout
WEIGHTS: dict[str, tuple[str, Callable[[], Any]]] = {
    "gslora_casia100": ("vit_face_p8s8-random.safetensors", random_face_vit),
    "gslora_pp_casia100": ("vit_face_p8s8-random.safetensors", random_face_vit),
    "gslora_imagenet100": ("vit_b_16-random.pth", random_torchvision_vit_b16),
    "gslora_pp_imagenet100": ("vit_b_16-random.pth", random_torchvision_vit_b16),
}


#: presets that run longest on CPU (AbU: a fixed 256-job micro-batch per loss sweep), started first
LONGEST = ("unlearn_mscoco",)

#: presets whose run reads a data folder in a release's format, generated at the preset's sizes with random content:
#: preset -> (folder name, writer, the overrides that point the run at it; ``{}`` is the folder)
DATA: dict[str, tuple[str, Callable[[Path], None], tuple[str, ...]]] = {
    "unlearn_mscoco": ("abu_mscoco-random", release_mscoco, ("data.root={}", "data.vae={}/vae")),
}


@dataclass
class SmokeResult:
    preset: str
    seconds: float
    peak_rss_mb: float
    passed: bool
    returncode: int
    log: str
    note: str = ""
    #: on a GPU: ``results.json`` ``peak_gpu_memory_gb`` (``make gpu-check``)
    peak_gpu_memory_gb: float | None = None


def presets() -> list[str]:
    """Every ``experiment=`` option, in name order."""
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def command(preset: str, out: Path, *, steps: int, cache_dir: Path) -> list[str]:
    """The ``launch.py`` command line of one smoke run."""
    return [
        sys.executable,
        str(ROOT / "launch.py"),
        f"experiment={preset}",
        *COMMON,
        f"trainer.max_steps={steps}",
        *SMOKE[preset],
        *([f"model.weights={weights_file(preset, cache_dir)}"] if preset in WEIGHTS else []),
        *(o.format(data_folder(preset, cache_dir)) for o in (DATA[preset][2] if preset in DATA else ())),
        f"hydra.run.dir={out / preset}",
        f"paths.cache_dir={cache_dir}",
    ]


def run_one(
    preset: str,
    out: Path,
    *,
    steps: int,
    cache_dir: Path,
    timeout: float,
    cmd: Callable[..., list[str]] | None = None,
) -> SmokeResult:
    """One preset in a child process (``cmd``: :func:`command` unless given); its wall time, its peak resident
    memory (``wait4``) and whether it wrote ``results.json`` with finite losses."""
    if preset in WEIGHTS:
        _written(weights_file(preset, cache_dir), WEIGHTS[preset][1])
    if preset in DATA:
        _once(data_folder(preset, cache_dir), DATA[preset][1])
    log_path = out / f"{preset}.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            (cmd or command)(preset, out, steps=steps, cache_dir=cache_dir),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
        )
        deadline, status, usage = t0 + timeout, None, None
        while status is None:
            pid, status_raw, usage_raw = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                status, usage = status_raw, usage_raw
            elif time.perf_counter() > deadline:
                # os.kill, not proc.kill: Popen polls (and may reap) the child first, and wait4 then has no child
                os.kill(proc.pid, signal.SIGKILL)
                _, status, usage = os.wait4(proc.pid, 0)
            else:
                time.sleep(0.5)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    seconds = time.perf_counter() - t0
    rc = proc.returncode
    peak_mb = usage.ru_maxrss / 1024
    results = out / preset / "results.json"
    note, gpu_gb, passed = "", None, rc == 0 and results.is_file()
    if rc != 0:
        note = "timed out" if seconds >= timeout else f"exit {rc}: {_last_line(log_path)}"
    elif not results.is_file():
        note = "no results.json"
    else:
        report = json.loads(results.read_text())
        gpu_gb = report.get("peak_gpu_memory_gb")
        stop = next((a for a in SMOKE.get(preset, ()) if a.startswith("stop_after_task=")), None)
        if report.get("completed") is False and stop is None:
            passed, note = False, "the report is incomplete"
        elif stop is not None:
            note = f"stopped where asked: {stop}"
        bad = [k for k, v in _numbers(report) if not math.isfinite(v) and _is_loss(k)]
        if bad:
            passed, note = False, f"non-finite loss: {', '.join(bad[:3])}"
    return SmokeResult(preset, round(seconds, 1), round(peak_mb, 1), passed, rc, str(log_path), note, gpu_gb)


def _last_line(log_path: Path) -> str:
    lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def _numbers(obj: Any, prefix: str = "") -> list[tuple[str, float]]:
    if isinstance(obj, dict):
        return [kv for k, v in obj.items() for kv in _numbers(v, f"{prefix}{k}.")]
    if isinstance(obj, list):
        return [kv for i, v in enumerate(obj) for kv in _numbers(v, f"{prefix}{i}.")]
    if isinstance(obj, float):
        return [(prefix.rstrip("."), obj)]
    return []


def _is_loss(key: str) -> bool:
    return "loss" in key.rsplit(".", 1)[-1]


def table(results: Sequence[SmokeResult]) -> str:
    """The printed table: preset -> seconds -> peak RSS -> pass/fail (and why not)."""
    rows = [("preset", "seconds", "peak RSS", "result")]
    for r in results:
        verdict = (f"pass ({r.note})" if r.note else "pass") if r.passed else f"FAIL ({r.note}; log {r.log})"
        rows.append((r.preset, f"{r.seconds:.0f}", f"{r.peak_rss_mb / 1024:.1f} GB", verdict))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)) + "  " + row[3] for row in rows
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m genattr.smoke", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated presets (default: every conf/experiment file)")
    parser.add_argument("--steps", type=int, default=2, help="trainer.max_steps: optimiser steps per stage")
    parser.add_argument("--jobs", type=int, default=1, help="presets run side by side (one core each)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before a preset is killed")
    parser.add_argument("--workdir", default=".cache/smoke", help="run folders, logs and the twins' cache")
    parser.add_argument("--out", default="bench_results/smoke_paper.json")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or presets()
    missing = [n for n in names if n not in SMOKE and n not in NOT_COVERED]
    if missing:
        parser.error(f"no smoke overrides for {missing} in genattr/smoke.py SMOKE (known: {sorted(SMOKE)})")
    skipped = [n for n in names if n in NOT_COVERED]
    # the longest first, so that the side-by-side jobs end together
    names = sorted((n for n in names if n in SMOKE), key=lambda n: n not in LONGEST)
    work = (ROOT / args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = work / stamp
    out.mkdir()
    print(f"smoke-paper: {len(names)} preset(s), trainer.max_steps={args.steps}, {args.jobs} at a time -> {out}")

    def one(name: str) -> SmokeResult:
        try:
            result = run_one(name, out, steps=args.steps, cache_dir=cache, timeout=args.timeout)
        except Exception as err:  # a failure to prepare one preset is that preset's failure, not the table's
            result = SmokeResult(name, 0.0, 0.0, False, -1, "-", note=f"{type(err).__name__}: {err}")
        print(f"  {name}: {'pass' if result.passed else 'FAIL'} in {result.seconds:.0f} s", flush=True)
        return result

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(one, names))
    print(table(results))
    for name in skipped:
        print(f"not covered on CPU: {name} ({NOT_COVERED[name]})")
    target = ROOT / args.out
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(
        json.dumps(
            {
                "steps": args.steps,
                "jobs": args.jobs,
                "cpu_count": os.cpu_count(),
                "results": [asdict(r) for r in results],
                "not_covered": {n: NOT_COVERED[n] for n in skipped},
            },
            indent=2,
        )
    )
    print(f"written: {target}")
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
