"""``make smoke-paper`` (genattr/smoke.py) and the CPU side of ``make gpu-check`` (genattr/gpu_check.py): every
preset is accounted for, a smoke run changes nothing of the paper's model or image size, failures are reported as
failures, and the throughput / MFU code runs (on CPU, tiny inputs) and renders the README table."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import compose_config
from omegaconf import OmegaConf

from genattr import gpu_check, smoke

#: what a smoke run may change besides the trainer: the twin (written at the real size) or generated release-format
#: data, random weights in place of released or twin-pretrained ones, and the counts that scale with the few images
#: (memory, augmentation; AbU's draws, timesteps, Fisher passes and leave-K-out plan)
ALLOWED = (
    "trainer.",
    "data.twin.",
    "data.root",
    "data.vae",
    "model.pretrained",
    "model.weights",
    "method.memory.size",
    "method.augmentation_factor",
    "method.features.clip.pretrained",
    "method.features.dino.pretrained",
    "method.features.clip_text.pretrained",
    "method.fisher.epochs",
    "method.unlearn.draws",
    "method.unlearn.batch_size",
    "method.sweep.time_samples",
    "method.evaluation.",
    "method.recall_ks",
    "tracking",
    "paths.",
    "stop_after_task",
)


def _flat(cfg) -> dict[str, object]:
    out: dict[str, object] = {}

    def walk(node: object, prefix: str) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix.rstrip(".")] = node

    walk(OmegaConf.to_container(cfg, resolve=False), "")
    return out


def test_every_preset_is_smoked_or_says_why_not():
    names = set(smoke.presets())
    assert names == set(smoke.SMOKE) | set(smoke.NOT_COVERED), names ^ (set(smoke.SMOKE) | set(smoke.NOT_COVERED))
    assert not set(smoke.SMOKE) & set(smoke.NOT_COVERED)
    assert len(names) >= 14


@pytest.mark.parametrize("preset", sorted(smoke.SMOKE))
def test_a_smoke_run_keeps_the_paper_model_and_image_size(preset, tmp_path):
    paper = _flat(compose_config([f"experiment={preset}"], tmp_path))
    cmd = smoke.command(preset, tmp_path, steps=2, cache_dir=tmp_path / "cache")
    overrides = [a for a in cmd[2:] if not a.startswith(("hydra.", "paths."))]
    smoked_cfg = compose_config(overrides, tmp_path)
    smoked = _flat(smoked_cfg)
    changed = sorted(k for k in set(paper) | set(smoked) if paper.get(k) != smoked.get(k))
    assert changed and all(k.startswith(ALLOWED) for k in changed), [k for k in changed if not k.startswith(ALLOWED)]
    assert smoked_cfg.trainer.max_steps == 2 and smoked_cfg.profile == "paper"
    # the twin is written at least as large as what the preset crops or feeds the model
    twin = smoked_cfg.data.twin.image_size
    for key in ("crop", "resize", "image_size"):
        if key in smoked_cfg.data and smoked_cfg.data[key] is not None:
            assert twin >= smoked_cfg.data[key], (key, twin)


def _fake(code: str):
    def cmd(preset, out, *, steps, cache_dir):
        (out / preset).mkdir(parents=True, exist_ok=True)
        return [sys.executable, "-c", code.replace("OUT", str(out / preset))]

    return cmd


def test_run_one_tells_pass_from_crash_timeout_and_a_non_finite_loss(tmp_path):
    ok = (
        "import json; json.dump({'train_loss': 0.5, 'acc': float('nan'), 'peak_gpu_memory_gb': 1.5}, "
        "open('OUT/results.json', 'w'))"
    )
    nan = "import json; json.dump({'per_task': [{'train_loss': float('nan')}]}, open('OUT/results.json', 'w'))"
    crash = "import sys; print('boom: a sentence'); sys.exit(3)"
    slow = "import time; time.sleep(30)"
    runs = {
        name: smoke.run_one(name, tmp_path, steps=2, cache_dir=tmp_path, timeout=5, cmd=_fake(code))
        for name, code in (("ok", ok), ("nan", nan), ("crash", crash), ("slow", slow))
    }
    assert runs["ok"].passed and runs["ok"].peak_rss_mb > 1  # a NaN that is not a loss is no failure
    assert runs["ok"].peak_gpu_memory_gb == 1.5 and runs["crash"].peak_gpu_memory_gb is None
    assert not runs["nan"].passed and "non-finite loss: per_task.0.train_loss" in runs["nan"].note
    assert not runs["crash"].passed and runs["crash"].note == "exit 3: boom: a sentence"
    assert not runs["slow"].passed and runs["slow"].note == "timed out" and runs["slow"].seconds < 15
    text = smoke.table(list(runs.values()))
    assert text.splitlines()[0].split() == ["preset", "seconds", "peak", "RSS", "result"]
    assert "ok" in text and "FAIL (exit 3: boom: a sentence; log" in text


def test_gpu_check_plans_every_preset_and_refuses_a_machine_without_a_gpu(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "genattr.gpu_check", "--plan", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    planned = json.loads(proc.stdout)
    assert set(planned["presets"]) == set(smoke.SMOKE) and set(planned["not_covered"]) == set(smoke.NOT_COVERED)
    for preset in smoke.SMOKE:
        args = planned["presets"][preset]
        assert "trainer.cpu=false" in args and "trainer.max_steps=3" in args
        assert "trainer.mixed_precision=no" not in args  # the preset's own precision
        assert not any(a.startswith("stop_after_task=") for a in args)  # every stage
    if not torch.cuda.is_available():
        assert gpu_check.main(["--workdir", str(tmp_path)]) == 2


def test_peak_and_mfu_figures_on_cpu_and_the_readme_table():
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.peak_tflops("NVIDIA H200") == 989.4
    assert gpu_check.peak_tflops("Tesla T4") is None
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    x, y = torch.randn(8, 64), torch.randn(8, 32)
    step = gpu_check.train_step(lin, x, y, torch.nn.functional.mse_loss, None)
    assert gpu_check.step_flops(step) == 2 * 2 * 8 * 64 * 32  # forward + the weight gradient (x needs none)
    out = gpu_check.throughput(torch.device("cpu"), scale=0.15, steps=1, warmup=0, peak=1.0)
    for key in ("lorax_convit_base_train", "detector_clip_vitl14_tune_train"):
        r = out[key]
        assert r["loss_finite"] and r["images_per_s"] > 0 and r["gflops_per_image"] > 0
        assert math.isclose(r["mfu"], r["achieved_tflops"] / 1.0, rel_tol=0.05, abs_tol=1e-3)
    assert out["lorax_eval_T5"]["batched_over_sequential"] > 0
    report = {
        "device": "cpu",
        "peak_bf16_tflops": 1.0,
        "throughput": out,
        "presets": [
            {"preset": "lorax_cddb_hard", "seconds": 12.0, "passed": True, "note": "", "peak_gpu_memory_gb": 3.2}
        ],
    }
    table = gpu_check.markdown(report)
    assert "| LoRAX ConViT-B r64 |" in table and "| lorax_cddb_hard | 12.0 | 3.2 GB | pass |" in table


def test_random_weights_are_written_once_in_the_layout_the_preset_loads(tmp_path):
    from genattr.models.face_vit import build_face_vit

    path = smoke.weights_file("gslora_casia100", tmp_path)
    assert smoke.weights_file("gslora_pp_casia100", tmp_path) == path  # one file for the presets that share it
    smoke._written(path, smoke.random_face_vit)
    stamp = path.stat().st_mtime_ns
    assert smoke._written(path, smoke.random_face_vit) == path and path.stat().st_mtime_ns == stamp
    arch = dict(img_size=112, patch_size=8, embed_dim=512, depth=6, num_heads=8, mlp_dim=2048)
    ck = {"lora": "drop", "lora_alpha": 1}
    net = build_face_vit(num_classes=100, weights=str(path), head={"s": 64.0, "m": 0.35}, checkpoint=ck, **arch)
    assert sum(p.numel() for p in net.parameters()) == 19_157_504  # conf/model/vit_face_p8s8.yaml's count


def test_generated_mscoco_release_has_the_preset_shapes_and_loads(tmp_path):
    from genattr.data.mscoco import load_mscoco
    from genattr.models.diffusion import build_diffusion, diffusion_kwargs, load_unet_weights

    paper = compose_config(["experiment=unlearn_mscoco"], tmp_path)
    folder = smoke._once(tmp_path / "rel", smoke.release_mscoco)
    protocol = load_mscoco(folder, vae=str(folder / "vae"))
    unet = paper.model.unet
    assert protocol.train_latents.shape == (8, unet.in_channels, unet.sample_size, unet.sample_size)
    assert protocol.train_text.shape == (4, 5, 77, unet.cross_attention_dim)  # COCO's 5 captions, CLIP's 77 tokens
    assert protocol.null_text is not None and protocol.vae == folder / "vae" and protocol.train_captions is not None
    model = build_diffusion(**diffusion_kwargs(OmegaConf.to_container(paper.model, resolve=True)))
    load_unet_weights(model.unet, protocol.unet_weights)  # strict: the preset's architecture
    assert sum(p.numel() for p in model.unet.parameters()) > 50_000_000  # the 57.4 M MSCOCO UNet, not a twin
    assert json.loads((folder / "vae" / "config.json").read_text())["block_out_channels"] == [128, 256, 512, 512]
