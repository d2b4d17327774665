"""Every paper preset (``conf/experiment/*.yaml``) composes, fits its data, builds its method the way
``genattr/run.py`` does, runs at paper size whatever ``data.root`` is, names its source and its command, and holds
the values its source publishes: a changed default or a dropped pin that moves a paper recipe fails here."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from genattr.config import apply_cpu_profile, check_compatibility, profile_in_use
from genattr.utils.instantiate import build

CONF = Path(__file__).resolve().parents[2] / "conf"
#: the originals a preset's header may name as its source (specs/*.md)
ORIGINALS = (
    "mit-ll/lorax_cil",
    "bjzhb666/GS-LoRA",
    "MI-BioLab/AI-GenBench",
    "PeterWang512/AttributeByUnlearning",
    "jonasricker/prada",
    "sprintml/DataProvenanceIAR",
)

_LORAX = {
    "method.name": "lorax",
    "model.name": "convit_base",
    "model.pretrained": True,
    "model.img_size": 224,
    "data.crop": 224,
    "seed": 0,
    # mit-ll/lorax_cil ganfake_convit_lorax.yaml + arg_parser (Table 1, 500 exemplars)
    "trainer.epochs": 50,
    "trainer.batch_size": 32,
    "trainer.eval_batch_size": 48,
    "trainer.mixed_precision": "fp16",
    "trainer.optimizer.lr": 1e-4,
    "trainer.optimizer.incremental_lr": 5e-4,
    "trainer.optimizer.weight_decay": 1e-6,
    "trainer.optimizer.scale_lr": True,
    "trainer.schedule.warmup_epochs": 5,
    "trainer.schedule.warmup_lr": 1e-4,
    "trainer.schedule.min_lr": 1e-5,
    "trainer.schedule.step_after_epoch": True,
    "method.memory.size": 500,
    "method.lora.r": 64,
    "method.lora.lora_alpha": 16,
    "method.lora.lora_dropout": 0.1,
    "method.targets": "gpsa_qk_v",
}

# bjzhb666/GS-LoRA scripts/run_cl_forget{,_image}.sh (the per-flag checks are in tests/methods/test_gslora.py)
_GSLORA = {
    "seed": 1337,
    "trainer.epochs": 100,
    "trainer.batch_size": 48,
    "trainer.mixed_precision": "no",
    "trainer.optimizer.lr": 1e-2,
    "method.lora.r": 8,
    "method.bnd": 105.0,
    "method.alpha": 1e-4,
    "data.scenario.num_tasks": 4,
    "data.scenario.first_classes": 80,
    "data.scenario.per_task": 20,
}

# MI-BioLab/AI-GenBench @2332e50 base_benchmark_sliding_windows.yaml + the model configs + local_config.yaml
_DETECTOR = {
    "method.name": "detector",
    "data.name": "aigenbench",
    "seed": 0,
    "data.generators_per_window": 4,
    "data.benchmark_type": "cumulative",
    "data.train_real_seed": 1337,
    "data.val_balance_seed": 1338,
    "data.val_shuffle_seed": 1340,
    "data.val_pairing_seed": 1341,
    "data.max_windows": None,
    "data.eval_pipeline.jpeg_quality": "code",
    "data.eval_pipeline.large_crop": "random",
    "model.pretrained": True,
    "model.input_size": 224,
    "method.augmentation_factor": 4,
    "method.train_aug": "baseline",
    "method.train_crop": "resize",
    "method.eval_crop": "resize",
    "trainer.epochs_per_window": 1,
    "trainer.global_batch_size": 512,
    "trainer.grad_accum": 1,
    "trainer.mixed_precision": "bf16",
    "trainer.num_workers": 8,
    "trainer.threshold": 0.5,
    "trainer.grad_clip": 1.0,
    "trainer.optimizer.lr": 1e-3,
    "trainer.optimizer.momentum": 0.9,
    "trainer.optimizer.dampening": 0.0,
    "trainer.optimizer.weight_decay": 1e-4,
    "trainer.schedule.pct_start": 0.3,
    "trainer.schedule.anneal_strategy": "cos",
    "trainer.schedule.div_factor": 25.0,
    "trainer.schedule.final_div_factor": 1e4,
    "trainer.schedule.cycle_momentum": True,
    "trainer.schedule.base_momentum": 0.85,
    "trainer.schedule.max_momentum": 0.95,
}
_DINOV2 = {"model.pos_embed_resample": "hub", "model.hub_pos_offset": 0.1, "model.hub_pos_antialias": False}
_CLIP = {"model.features": "embedding", "model.normalize_features": True, "model.head_init_std": 0.02}

# sprintml/DataProvenanceIAR configs/{var,rar}.yaml, jonasricker/prada predict.py + src/prada/prada.py,
# rizvisaira/iar-model-tracer (decision rule, Stage 2, top-5 classes)
_TRACER = {
    "method.name": "prada",
    "data.name": "rarvar",
    "model.name": "prada_real",
    "data.image_size": 256,
    "trainer.mixed_precision": "no",
    "method.class_source": "topk",
    "method.topk": 5,
    "method.class_aggregate": "max",
    "method.classifier.name": "convnext_large.fb_in1k",
    "method.classifier.pretrained": True,
    "method.classifier.train": False,
    "model.var.variants.var30.generator.depth": 30,
    "model.var.variants.var16.generator.cfg": 1.5,
    "model.var.variants.var16.generator.top_k": 900,
    "model.var.variants.var16.generator.top_p": 0.96,
    "model.rar.variants.rarb.generator.guidance_scale": 16.0,
    "model.rar.variants.rarxxl.generator.guidance_scale_pow": 1.2,
}

#: preset -> {dotted key: the source's value}
PINNED: dict[str, dict[str, Any]] = {
    **{f"lorax_cddb_{s}": {**_LORAX, "data.name": f"cddb_{s}"} for s in ("easy", "hard", "long")},
    "gslora_casia100": {**_GSLORA, "method.name": "gslora", "data.name": "casia100", "model.depth": 6},
    "gslora_pp_casia100": {**_GSLORA, "method.name": "gslora_pp", "data.name": "casia100", "model.depth": 6},
    "gslora_imagenet100": {**_GSLORA, "method.name": "gslora", "data.name": "imagenet100", "model.pretrained": True},
    "gslora_pp_imagenet100": {
        **_GSLORA,
        "method.name": "gslora_pp",
        "data.name": "imagenet100",
        "model.pretrained": True,
    },
    # dinov2_probe_resize.yaml 64 x 8 (eval 64), dinov2_tune_resize.yaml 16 x 32 (eval 24),
    # ViTL14_openclip_probe_resize.yaml 512 x 1 (eval 512), ViTL14_openclip_tune_resize.yaml 16 x 32 (eval 16)
    "detector_dinov2_probe": {
        **_DETECTOR,
        **_DINOV2,
        "model.name": "vit_large_patch14_dinov2.lvd142m_probe",
        "trainer.batch_size": 64,
        "trainer.eval_batch_size": 64,
    },
    "detector_dinov2_tune": {
        **_DETECTOR,
        **_DINOV2,
        "model.name": "vit_large_patch14_dinov2.lvd142m_tune",
        "trainer.batch_size": 16,
        "trainer.eval_batch_size": 24,
    },
    "detector_clip_probe": {
        **_DETECTOR,
        **_CLIP,
        "model.name": "open_clip:ViT-L-14.commonpool_xl_s13b_b90k_probe",
        "trainer.batch_size": 512,
        "trainer.eval_batch_size": 512,
    },
    "detector_clip_tune": {
        **_DETECTOR,
        **_CLIP,
        "model.name": "open_clip:ViT-L-14.commonpool_xl_s13b_b90k_tune",
        "trainer.batch_size": 16,
        "trainer.eval_batch_size": 16,
    },
    # AttributeByUnlearning mscoco/compute_influence.py, compute_fisher.py, compute_training_loss.py,
    # generate_samples.py; paper App. B.1 and Table 1
    "unlearn_mscoco": {
        "method.name": "unlearn",
        "data.name": "mscoco",
        "model.name": "unet_mscoco",
        "model.unet.block_out_channels": [128, 256, 256, 256],
        "model.unet.cross_attention_dim": 1024,
        "model.scheduler.num_train_timesteps": 1000,
        "seed": 0,
        "trainer.epochs": 200,
        "trainer.batch_size": 128,
        "trainer.optimizer.lr": 1e-4,
        "trainer.mixed_precision": "no",
        "method.weights": "cross_attn_kv",
        "method.unlearn.alpha": 0.01,
        "method.unlearn.steps": 1,
        "method.unlearn.draws": 80 * 625,
        "method.unlearn.batch_size": 80,
        "method.unlearn.damping": 0,
        "method.unlearn.n_train": None,
        "method.fisher.epochs": 5,
        "method.fisher.batch_size": 32,
        "method.sweep.time_samples": 20,
        "method.sweep.batch_size": 8000,
        "method.sweep.caption_noise": "independent",
        "method.noise_seed": 0,
        "method.baselines": ["random", "pixel", "text", "clip", "dino"],
        "method.features.clip.name": "vit_base_patch32_clip_quickgelu_224.openai",
        "method.features.dino.name": "vit_base_patch16_224.dino",
        "method.evaluation.enabled": True,
        "method.evaluation.coupling": "independent",
        "method.evaluation.retrains": "plan",
        "method.evaluation.oracle": False,
        "method.evaluation.ks": [500, 1000, 4000],
        "method.evaluation.methods": ["unlearn", "pixel", "text", "clip", "dino"],
        "method.evaluation.random_seeds": 10,
        "method.evaluation.ground_truth_only": False,
        "method.evaluation.loss_time_samples": 200,
        "method.evaluation.regen.scheduler": "ddpm",
        "method.evaluation.regen.steps": 1000,
        "method.evaluation.regen.guidance_scale": 7.5,
    },
    "prada_two_stage_rarvar": {
        **_TRACER,
        "method.pipeline": "two_stage",
        "seed": 0,
        "method.batch_size": 8,
        "method.pairs.batch_size": 8,
        "method.pairs.seed": 0,
        "method.inverse.holdout": 0.0,
        "method.inverse.step_size": 2,
        "method.inverse.gamma": 0.9,
        "method.inverse.var": {"epochs": 10, "lr": 5e-5, "batch_size": 16, "augment": None},
        "method.inverse.rar": {"epochs": 50, "lr": 5e-4, "batch_size": 8, "augment": None},
        "method.stage1.signal": "comb",
        "method.stage1.optimized_quant": True,
        "method.stage1.alg3.rounds_stop_scale": 4,
        "method.stage1.alg3.iters": 200,
        "method.stage1.alg3.lr": 0.1,
        "method.stage1.alg3.tau": [2.0, 0.5],
        "method.stage1.alg3.init_logit": 0.5,
        "method.stage1.alg3.keep_best": False,
        "method.stage1.quantized_reconstruction": False,
        "method.stage1.quant_reduce": "mean",
        "method.stage1.threshold.strategy": "quantile",
        "method.stage1.threshold.q": 0.95,
        "method.stage2.calibration": "logreg",
        "method.stage2.features": ["logp_cond", "logp_uncond", "logp_guided", "rank"],
        "method.stage2.outlier_gate.enabled": False,
    },
    "prada_one_step_rarvar": {
        **_TRACER,
        "method.pipeline": "one_step",
        "seed": 42,
        "method.seed": 42,
        "method.prada.tokens": "greedy_original",
        "method.prada.hidden": 16,
        "method.prada.epochs": 3000,
        "method.prada.lr": 1e-3,
        "method.prada.smoothing": 0.05,
        "method.prada.weight_penalty": 0.1,
        "method.prada.noise": 0.1,
        "method.prada.position_groups": 1,
        "method.prada.generated_per_variant": 0,
        "method.prada.threshold": 0.0,
    },
}


def _presets() -> list[str]:
    return sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def test_every_preset_records_its_source_values():
    """A new preset must say here what its source publishes (and a listed one must exist)."""
    assert sorted(PINNED) == _presets()


@pytest.mark.parametrize("preset", _presets())
def test_preset_composes_builds_and_pins_the_source_recipe(compose_cfg, preset):
    cfg = compose_cfg([f"experiment={preset}"])
    check_compatibility(cfg)
    # paper size on the twin too (data.root is null here): the CPU profile never applies
    assert cfg.profile == "paper" and profile_in_use(cfg) == "paper" and apply_cpu_profile(cfg, set()) == []
    assert list(cfg.tags)[0] == "paper" and cfg.method.name in cfg.tags
    OmegaConf.resolve(cfg)
    for key, want in PINNED[preset].items():
        got = OmegaConf.select(cfg, key, throw_on_missing=True)
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
        assert got == want and type(got) is type(want), f"{preset}: {key} = {got!r}, the source says {want!r}"
    method = build(
        cfg.method,
        model=OmegaConf.to_container(cfg.model, resolve=True),
        trainer=OmegaConf.to_container(cfg.trainer, resolve=True),
    )
    assert method.name == cfg.method.name


@pytest.mark.parametrize("preset", _presets())
def test_preset_header_names_its_source_and_its_command(preset):
    text = (CONF / "experiment" / f"{preset}.yaml").read_text()
    header = text.split("\ndefaults:", 1)[0]
    assert text.startswith("# @package _global_\n")
    assert re.search(r"\bTable [0-9IV]+\b", header) or "publishes no table" in header, f"{preset}: no table named"
    assert any(repo in header for repo in ORIGINALS), f"{preset}: no original repository named"
    assert f"python launch.py experiment={preset} data.root=" in header
