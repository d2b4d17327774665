"""The AI-GenBench detector: model factory (probe / tune), metrics against scikit-learn, the OneCycle schedule,
configs and the bench."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from sklearn import metrics as skm

from genattr.config import check_compatibility
from genattr.methods.detection.detector import one_cycle, sgd
from genattr.metrics.detection import auroc, benchmark_score, roc_curve, thresholded
from genattr.models.detectors import build_detector
from genattr.utils.errors import ConfigError


# -- model factory ------------------------------------------------------------------------------
def test_unknown_or_unsuffixed_names_are_errors_that_say_how_to_list_names() -> None:
    with pytest.raises(ConfigError, match=r"not a timm model.*timm.list_models"):
        build_detector(name="resnet51_tune", pretrained=False)
    with pytest.raises(ConfigError, match="must end in _probe"):
        build_detector(name="resnet18", pretrained=False)


def _optimizer(compose_cfg, det: torch.nn.Module, steps: int, *overrides: str) -> tuple:
    """The detector's SGD + OneCycleLR as ``conf/trainer/detector.yaml`` sets them."""
    tr = compose_cfg(["method=detector", "data=aigenbench", *overrides]).trainer
    opt = sgd(det, tr.optimizer)
    return opt, one_cycle(opt, steps, max_lr=tr.optimizer.lr, schedule=tr.schedule)


def test_probe_keeps_the_backbone_frozen_in_eval_mode_and_out_of_optimizer_and_checkpoint(compose_cfg) -> None:
    torch.manual_seed(0)
    det = build_detector(name="test_resnet_probe", pretrained=False, input_size=32)
    before = {k: v.clone() for k, v in det.backbone.state_dict().items()}
    det.train()
    assert not det.backbone.training and det.head.training
    opt, sched = _optimizer(compose_cfg, det, 3, "trainer.optimizer.lr=0.5")
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in det.head.parameters()}
    for _ in range(3):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(det(torch.randn(4, 3, 32, 32)), torch.ones(4))
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    after = det.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm running stats included
    assert all(p.grad is None for p in det.backbone.parameters())
    assert set(det.trainable_state()) == {"head.weight", "head.bias"}


def test_tune_trains_everything_including_batchnorm() -> None:
    det = build_detector(name="test_resnet_tune", pretrained=False)
    det.train()
    assert det.backbone.training
    assert all(p.requires_grad for p in det.parameters())
    assert set(det.trainable_state()) == set(det.state_dict())


def test_paper_backbones_have_the_published_feature_sizes() -> None:
    with torch.device("meta"):
        dino = build_detector(name="vit_large_patch14_dinov2.lvd142m_probe", pretrained=False, kwargs={"img_size": 224})
        clip = build_detector(
            name="vit_large_patch14_clip_224.openai_tune",
            pretrained=False,
            kwargs={"img_size": 224},
            features="embedding",
            normalize_features=True,
        )
        rn50 = build_detector(name="resnet50_clip.openai_tune", pretrained=False, features="embedding")
    assert dino.head.in_features == 1024 and clip.head.in_features == 768 and rn50.head.in_features == 1024


def test_onecycle_cycles_momentum_and_peaks_at_the_lr(compose_cfg) -> None:
    det = build_detector(name="test_resnet_tune", pretrained=False)
    opt, sched = _optimizer(compose_cfg, det, 100)
    lrs, moms = [], []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        moms.append(opt.param_groups[0]["momentum"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-3 / 25) and max(lrs) == pytest.approx(1e-3, rel=1e-3)
    assert int(np.argmax(lrs)) in (29, 30) and lrs[-1] < 1e-6
    assert moms[0] == pytest.approx(0.95) and min(moms) == pytest.approx(0.85, abs=1e-3)
    assert opt.param_groups[0]["weight_decay"] == 1e-4


# -- metrics --------------------------------------------------------------------------------------
def test_auroc_and_thresholded_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.uniform(size=500) * 0.6 + 0.4 * y, 2)  # many ties
    assert auroc(y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    m = thresholded(y, s, 0.5)
    pred = (s > 0.5).astype(int)  # scores of exactly 0.5 are among the ties
    assert (s == 0.5).any()
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert m["recall"] == pytest.approx(skm.recall_score(y, pred))
    fpr, tpr = roc_curve(y, s)
    fpr2, tpr2, _ = skm.roc_curve(y, s, drop_intermediate=False)
    assert np.allclose(fpr, fpr2) and np.allclose(tpr, tpr2)
    assert np.isnan(auroc(np.ones(5), np.arange(5)))


def test_a_score_exactly_at_the_threshold_is_real() -> None:
    # AI-GenBench: evaluation_scripts/evaluate_predictions_utils.py `(predictions > threshold)` on sigmoid
    # scores, and torchmetrics' binary stat scores (`preds > threshold` on probabilities in [0, 1]) behind
    # BalancedBinaryAccuracy / BinaryPrecision / BinaryRecall in algorithms/base_model.py
    y = np.array([1, 1, 0, 0])
    s = np.array([0.5, 0.9, 0.5, 0.1], dtype=np.float32)
    m = thresholded(y, s, 0.5)
    assert m["recall"] == 0.5 and m["specificity"] == 1.0 and m["precision"] == 1.0
    assert m["balanced_accuracy"] == 0.75
    try:
        from torchmetrics.classification import BinaryRecall, BinarySpecificity
    except ImportError:
        return
    t, target = torch.from_numpy(s), torch.from_numpy(y)
    assert float(BinaryRecall(threshold=0.5)(t, target)) == m["recall"]
    assert float(BinarySpecificity(threshold=0.5)(t, target)) == m["specificity"]


def test_score_excludes_the_last_window() -> None:
    assert benchmark_score([0.6, 0.8, 0.99]) == pytest.approx(0.7)


# -- configs --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "model", ["dinov2_vitl14_probe", "dinov2_vitl14_tune", "clip_vitl14_probe", "clip_vitl14_tune", "rn50_clip_tune"]
)
def test_detector_configs_compose_with_the_paper_recipe(compose_cfg, model: str) -> None:
    cfg = compose_cfg(["method=detector", "data=aigenbench", f"model={model}"])
    assert cfg.model.name.endswith(model.rsplit("_", 1)[1])
    assert cfg.trainer.global_batch_size == 512 and cfg.trainer.optimizer.lr == 1e-3
    assert cfg.method.augmentation_factor == 4 and cfg.data.generators_per_window == 4
    assert cfg.data.eval_pipeline.jpeg_quality == "code" and cfg.data.eval_pipeline.large_crop == "random"
    assert cfg.method.train_variants == "per_window"  # the original's cumulative list, newest window first
    assert cfg.data.val_balance_seed == 1338 and cfg.data.val_shuffle_seed == 1340
    assert cfg.data.val_pairing_seed == 1341
    check_compatibility(cfg)


def test_train_variants_flag_is_checked(compose_cfg) -> None:
    from genattr.methods.detection.detector import SlidingWindowDetector

    method = OmegaConf.to_container(compose_cfg(["method=detector", "data=aigenbench"]).method)
    method = {k: v for k, v in method.items() if k != "_target_"} | {"train_variants": "window0"}
    with pytest.raises(ConfigError, match="method.train_variants='window0'"):
        SlidingWindowDetector(**method, model={}, trainer={})


def test_default_detector_is_dinov2_and_protocols_are_checked(compose_cfg) -> None:
    cfg = compose_cfg(["method=detector", "data=aigenbench"])
    assert cfg.model.name == "vit_large_patch14_dinov2.lvd142m_tune" and cfg.model.pos_embed_resample == "hub"
    with pytest.raises(ConfigError, match="detection"):
        check_compatibility(compose_cfg(["method=lorax", "data=aigenbench"]))
    with pytest.raises(ConfigError, match="continual"):
        check_compatibility(compose_cfg(["method=detector", "data=cddb_hard"]))


def test_bench_detector_writes_its_figures(tmp_path: Path) -> None:
    from genattr.bench.__main__ import main

    out = tmp_path / "detector.json"
    args = ["detector", "--model", "test_resnet", "--img-size", "32", "--batch", "4", "--source-size", "96", "64"]
    assert main([*args, "--images", "8", "--workers", "0", "--repeats", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["probe_step"]["trainable_params"] < res["tune_step"]["trainable_params"]
    assert res["eval_pipeline_images_per_s"] > 0 and res["train_loader_images_per_s"] > 0
