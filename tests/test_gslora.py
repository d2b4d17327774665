"""GS-LoRA units: H-mean, the group penalty, merging, freezing, the face ViT and ImageNet head, the
real-layout loaders and their errors, the scenario maths, and config composition."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genattr.config import apply_twin_profile, check_compatibility, explicit_override_keys
from genattr.data.faces import build_casia100
from genattr.data.forgetting import class_order, make_tasks, select_subset
from genattr.data.imagenet100 import build_imagenet100
from genattr.methods.forgetting.lora import attach_lora, group_norms, group_tensors, merge, structure_loss
from genattr.metrics.forgetting import h_mean, pooled_accuracy, zero_group_ratio
from genattr.models.face_vit import FaceViT, build_imagenet_vit
from genattr.utils.errors import ConfigError, DataError

SCENARIO = {"num_tasks": 1, "first_classes": 2, "per_task": 1, "data_ratio": None, "order_seed": 1337}


def tiny_vit(n: int = 5) -> FaceViT:
    torch.manual_seed(0)
    return FaceViT(num_classes=n, img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, mlp_dim=32)


def test_h_mean_matches_the_spec_example():
    assert h_mean(74.65, 74.16, 0.0) == pytest.approx(74.40, abs=0.005)
    assert h_mean(80.0, 50.0, 60.0) == 0.0  # accuracy rose: no forgetting
    correct, total = np.array([1, 2, 0]), np.array([2, 2, 4])
    assert pooled_accuracy(correct, total, [0, 1]) == pytest.approx(75.0)
    assert math.isnan(pooled_accuracy(correct, total, []))
    assert zero_group_ratio([0.0, 1e-4, 0.5, 2.0], 1e-3) == 0.5


def test_group_penalty_value_and_gradient_on_a_hand_made_adapter():
    model = attach_lora(tiny_vit(), {"r": 2, "lora_alpha": 1})
    groups = group_tensors(model)
    assert len(groups) == 2 and all(len(g) == 4 for g in groups)
    with torch.no_grad():
        for k, g in enumerate(groups):
            for j, p in enumerate(g):
                p.fill_(0.1 * (k + 1) * (j + 1) if k == 0 else 0.0)
    expected = math.sqrt(sum((0.1 * (j + 1)) ** 2 * p.numel() for j, p in enumerate(groups[0])))
    loss = structure_loss(groups)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    for j, p in enumerate(groups[0]):  # d ||g|| / dP = P / ||g||
        torch.testing.assert_close(p.grad, torch.full_like(p, 0.1 * (j + 1) / expected))
    assert group_norms(model)[1] == 0.0


def test_lora_is_1_over_r_on_ffn_only_and_freezes_everything_else():
    net = tiny_vit()
    model = attach_lora(net, {"r": 4, "lora_alpha": 1})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and ".mlp.fc" in n for n in trainable)
    fc1 = model.get_base_model().blocks[0].mlp.fc1
    assert fc1.scaling["default"] == pytest.approx(0.25)
    x = torch.rand(3, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        out_b0 = model(x)[0]
        with model.disable_adapter():
            plain = model(x)[0]
    torch.testing.assert_close(out_b0, plain)  # B = 0: the adapter is a no-op


def test_merge_preserves_outputs():
    model = attach_lora(tiny_vit(), {"r": 4, "lora_alpha": 1})
    with torch.no_grad():
        for g in group_tensors(model):
            for p in g:
                p.normal_(0, 0.5)
    model.eval()
    x = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        before = model(x)[0]
        merged = merge(model)
        after = merged(x)[0]
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_face_vit_p8s8_parameter_count_and_cosface_margin():
    with torch.device("meta"):
        net = FaceViT(num_classes=100)
        model = attach_lora(net, {"r": 8, "lora_alpha": 1})
    lora = sum(p.numel() for g in group_tensors(model) for p in g)
    assert lora == 245_760 and sum(p.numel() for p in net.parameters()) - lora == 19_157_504
    small = tiny_vit().eval()
    x, y = torch.rand(2, 3, 16, 16), torch.tensor([1, 3])
    plain, emb = small(x)
    margin, _ = small(x, y)
    assert emb.shape == (2, 16)
    torch.testing.assert_close(plain - margin, torch.nn.functional.one_hot(y, 5) * 64.0 * 0.35)


def test_imagenet_vit_b16_head_is_sliced_by_the_folder_mapping_on_meta():
    ids = list(range(0, 1000, 10))
    with torch.device("meta"):
        net = build_imagenet_vit(num_classes=100, class_ids=ids, name="vit_base_patch16_224", pretrained=False)
    assert sum(p.numel() for p in net.parameters()) == 85_875_556
    assert net.head.weight.shape == (100, 768) and len(net.blocks) == 12
    vit = build_imagenet_vit(
        num_classes=2,
        class_ids=[3, 7],
        name="vit_tiny_patch16_224",
        img_size=16,
        kwargs={"patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2},
    )
    assert vit(torch.rand(1, 3, 16, 16))[0].shape == (1, 2)


def test_scenario_order_tasks_and_subsets():
    order = class_order(100, 1337)
    assert sorted(order) == list(range(100)) and order != list(range(100))
    assert order == class_order(100, 1337)
    tasks = make_tasks(order, num_tasks=4, first_classes=80, per_task=20)
    assert [t.name for t in tasks] == ["100-20", "80-20", "60-20", "40-20"]
    assert tasks[1].forget == tuple(order[60:80]) and tasks[1].old == tuple(order[80:100])
    assert len(tasks[3].remain) == 20 and not set(tasks[3].forget) & set(tasks[3].remain)
    with pytest.raises(ConfigError, match="do not fit"):
        make_tasks(order, num_tasks=5, first_classes=60, per_task=20)
    labels = np.repeat(np.arange(10), 10)
    few = select_subset(labels, data_ratio=0.1, few_shot=4, ratio_over_split=True, missing=[2], seed=0)
    assert np.bincount(labels[few], minlength=10).tolist() == [4, 4, 0] + [4] * 7
    per_class = select_subset(labels, data_ratio=0.3, few_shot=None, ratio_over_split=False, missing=[], seed=0)
    assert np.bincount(labels[per_class]).tolist() == [3] * 10


def _write(folder: Path, n: int, suffix: str = ".jpg", size: int = 12) -> None:
    folder.mkdir(parents=True)
    for k in range(n):
        Image.fromarray(np.full((size, size, 3), 40 * k, np.uint8)).save(folder / f"{k}{suffix}")


def test_casia_loader_reads_the_real_layout(tmp_path):
    root = tmp_path / "faces_webface_112x112_sub100_train_test"
    for ident in ("0000099", "0000045", "0000107"):
        _write(root / "train" / ident, 3)
        _write(root / "test" / ident, 2)
    p = build_casia100(name="casia100", root=str(root), image_size=16, scenario=SCENARIO)
    assert p.source == "real" and p.class_names == ["0000045", "0000099", "0000107"] and p.n_classes == 3
    assert len(p.train) == 9 and len(p.test) == 6
    x, y = p.train[3]
    assert x.shape == (3, 16, 16) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and y == 1
    assert p.tasks[0].name == "3-1" and len(p.train_of(p.tasks[0].remain)) == 6


def test_wrong_layout_and_missing_folder_names_are_clear_errors(tmp_path):
    root = tmp_path / "casia"
    _write(root / "train" / "0000001", 2)
    with pytest.raises(DataError, match=r"casia/test does not exist; expected the layout"):
        build_casia100(name="casia100", root=str(root), image_size=16, scenario=SCENARIO)
    with pytest.raises(DataError, match="does not exist"):
        build_casia100(name="casia100", root=str(tmp_path / "nope"), image_size=16, scenario=SCENARIO)
    inet = tmp_path / "imagenet100"
    for wnid in ("n01440764", "n01443537", "n01484850"):
        _write(inet / "train" / wnid, 2, ".JPEG")
        _write(inet / "test" / wnid, 1, ".JPEG")
    with pytest.raises(DataError, match="imagenet_folder_names.txt does not exist"):
        build_imagenet100(name="imagenet100", root=str(inet), resize=16, crop=16, scenario=SCENARIO)
    (inet / "imagenet_folder_names.txt").write_text("n01440764\nn01443537\n")
    with pytest.raises(DataError, match="does not list the class folder"):
        build_imagenet100(name="imagenet100", root=str(inet), resize=16, crop=16, scenario=SCENARIO)
    (inet / "imagenet_folder_names.txt").write_text("n00000001\nn01440764\nn01443537\nn01484850\n")
    p = build_imagenet100(name="imagenet100", root=str(inet), resize=16, crop=16, scenario=SCENARIO)
    assert p.info["imagenet_ids"] == [1, 2, 3] and p.train[0][0].shape == (3, 16, 16)


@pytest.mark.parametrize(
    "overrides",
    [
        ["method=gslora", "data=casia100"],
        ["method=gslora_pp", "data=imagenet100", "model=vit_b16_imagenet100"],
        ["method=lora", "data=casia100", "data.scenario.num_tasks=1", "data.scenario.first_classes=90"],
        ["method=pretrain", "data=casia100"],
        *[[f"method={m}", "data=casia100"] for m in ("retrain", "l2", "ewc", "mas", "lwf", "derpp", "scrub")],
        ["method=gslora", "data=casia100", "data.scenario.few_shot=4", "data.scenario.missing=5"],
    ],
)
def test_forgetting_options_compose_with_the_paper_defaults(compose_cfg, overrides):
    cfg = compose_cfg(overrides)
    check_compatibility(cfg)
    assert cfg.data.protocol == "forgetting" and cfg.trainer.batch_size == 48 and cfg.trainer.epochs == 100
    if cfg.method.name != "pretrain":
        assert cfg.method.bnd == 105.0 and cfg.method.eval_margin is True
    if cfg.method.name.startswith("gslora"):
        assert cfg.method.lora.r == 8 and cfg.method.lora.lora_alpha == 1 and cfg.method.alpha == 1e-4
    if cfg.data.name == "casia100":
        assert cfg.model.embed_dim == 512 and cfg.model.depth == 6 and cfg.model.head.s == 64.0


def test_twin_profile_shrinks_the_face_run_but_the_command_line_wins(compose_cfg):
    ov = ["method=gslora", "data=casia100", "trainer.epochs=3"]
    cfg = compose_cfg(ov)
    apply_twin_profile(cfg, explicit_override_keys(ov))
    assert cfg.trainer.epochs == 3 and cfg.model.embed_dim == 64 and cfg.method.bnd == 26.0
    assert cfg.data.scenario.first_classes == 17 and cfg.data.scenario.order_seed == 1337


def test_forgetting_method_refuses_another_protocol(compose_cfg):
    with pytest.raises(ConfigError, match="supports the protocols"):
        check_compatibility(compose_cfg(["method=gslora", "data=cddb_hard"]))
