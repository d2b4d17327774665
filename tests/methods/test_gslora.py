"""GS-LoRA units: H-mean, the group penalty, merging, freezing, the face ViT and ImageNet head, the
real-layout loaders and their errors, the scenario maths, the per-task subsets, the LR schedule, the
best-H report, and config composition.

Facts from the original are taken from ``bjzhb666/GS-LoRA`` at ``a92fb97``."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genattr.config import apply_cpu_profile, check_compatibility, explicit_override_keys
from genattr.data.faces import build_casia100
from genattr.data.forgetting import ForgetTask, class_order, make_tasks, select_subset, task_subsets
from genattr.data.imagenet100 import build_imagenet100, imagenet_transform
from genattr.engine.schedule import epoch_lrs
from genattr.methods.forgetting.loop import ForgettingLoop, _BestH
from genattr.methods.forgetting.lora import (
    attach_lora,
    ffn_targets,
    group_norms,
    group_tensors,
    merge,
    structure_loss,
)
from genattr.metrics.forgetting import h_mean, pooled_accuracy, zero_group_ratio
from genattr.models.face_vit import FaceViT
from genattr.models.imagenet_vit import build_imagenet_vit, torchvision_to_timm
from genattr.utils.errors import ConfigError, DataError

SCENARIO = {
    "num_tasks": 1,
    "first_classes": 2,
    "per_task": 1,
    "data_ratio": None,
    "order_seed": 1337,
    "subset_per_task": True,
    "ratio_over_split": True,
    "few_shot": None,
    "missing": 0,
    "subset_seed": 1337,
}


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
    # util/utils.py:replace_ffn_with_lora puts LoRA on both Linears of every encoder block's mlp (mlp.0, mlp.3),
    # engine_cl.py:get_structure_loss groups them per block (encoder_layer_0..11)
    targets = ffn_targets(net)
    assert len(targets) == 24 and targets[:2] == ["vit.blocks.0.mlp.fc1", "vit.blocks.0.mlp.fc2"]
    assert len(group_tensors(attach_lora(net, {"r": 8, "lora_alpha": 1}))) == 12
    vit = build_imagenet_vit(
        num_classes=2,
        class_ids=[3, 7],
        name="vit_tiny_patch16_224",
        img_size=16,
        kwargs={"patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2},
    )
    assert vit(torch.rand(1, 3, 16, 16))[0].shape == (1, 2)


# train/train_own_forget_cl.py: order_list = list(range(100)); random.seed(1337); random.shuffle(order_list),
# run in a scratch folder (Python 3.11) -- the class order every CASIA-100 / ImageNet100 table uses
ORIGINAL_ORDER_1337 = [
    83, 17, 10, 9, 89, 52, 7, 32, 37, 77, 61, 34, 78, 55, 56, 63, 69, 22, 75, 66,
    35, 72, 71, 23, 86, 38, 24, 5, 29, 30, 16, 11, 82, 19, 57, 14, 91, 27, 98, 53,
    0, 20, 59, 28, 47, 18, 6, 48, 12, 62, 1, 43, 3, 60, 41, 85, 4, 95, 97, 36,
    94, 65, 67, 99, 25, 33, 70, 40, 92, 31, 58, 15, 45, 2, 87, 76, 80, 44, 64, 8,
    51, 54, 13, 88, 84, 26, 50, 39, 96, 81, 49, 42, 21, 93, 74, 73, 46, 90, 68, 79,
]  # fmt: skip


def test_class_order_is_the_originals():
    assert class_order(100, 1337) == ORIGINAL_ORDER_1337
    tasks = make_tasks(class_order(100, 1337), num_tasks=4, first_classes=80, per_task=20)
    assert tasks[0].forget[:5] == (51, 54, 13, 88, 84) and tasks[3].forget[:5] == (35, 72, 71, 23, 86)
    assert class_order(100, 0) != ORIGINAL_ORDER_1337


def test_scenario_order_tasks_and_subsets():
    order = class_order(100, 1337)
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


def test_subsets_are_drawn_per_task_from_the_forget_and_remain_sets():
    # train_own_forget_cl.py, every task: randperm(len(forget))[:int(len(forget) * data_ratio)], same for remain
    labels = np.repeat(np.arange(10), [7, 9, 11, 13, 15, 17, 19, 21, 23, 25])
    tasks = make_tasks(list(range(10)), num_tasks=2, first_classes=6, per_task=2)
    sc = {"data_ratio": 0.3, "subset_seed": 5, "subset_per_task": True, "ratio_over_split": True, "few_shot": None}
    subs = task_subsets(labels, tasks, scenario=sc, missing=[1])
    for task, (remain, forget) in zip(tasks, subs, strict=True):
        n_forget = int(np.isin(labels, task.forget).sum())
        n_remain = int(np.isin(labels, [c for c in task.remain if c != 1]).sum())
        assert len(forget) == int(n_forget * 0.3) and len(remain) == int(n_remain * 0.3)
        assert set(labels[forget]) <= set(task.forget) and set(labels[remain]) <= set(task.remain) - {1}
    # task 1's remaining classes are a subset of task 0's, but their images are drawn anew
    shared = np.isin(labels, tasks[1].remain)
    r0, r1 = (r[shared[r]] for r, _ in subs)
    assert not np.array_equal(r0[: len(r1)], r1)
    again = task_subsets(labels, tasks, scenario=sc, missing=[1])
    assert all(np.array_equal(a, b) for pa, pb in zip(subs, again, strict=True) for a, b in zip(pa, pb, strict=True))
    once = task_subsets(labels, tasks, scenario={**sc, "subset_per_task": False}, missing=[1])
    budget = select_subset(labels, data_ratio=0.3, few_shot=None, ratio_over_split=True, missing=[1], seed=5)
    assert np.array_equal(np.sort(np.concatenate(once[0])), budget[np.isin(labels[budget], range(8))])
    few = task_subsets(labels, tasks, scenario={**sc, "few_shot": 2}, missing=[1])
    assert np.bincount(labels[few[1][0]], minlength=10).tolist() == [2, 0, 2, 2] + [0] * 6


def _timm_lrs_stepped_before_each_epoch(lr: float, warmup: int, epochs: int = 100) -> list[float]:
    """The original's per-task timm ``CosineLRScheduler`` (min-lr 1e-5, warm-up from 1e-6), ``step(epoch)`` first."""
    timm_sched = pytest.importorskip("timm.scheduler")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = timm_sched.CosineLRScheduler(
        opt, t_initial=epochs, lr_min=1e-5, warmup_t=warmup, warmup_lr_init=1e-6, warmup_prefix=False, t_in_epochs=True
    )
    want = []
    for epoch in range(epochs):
        sched.step(epoch)
        want.append(opt.param_groups[0]["lr"])
    return want


def test_lr_schedule_steps_before_each_epoch_as_the_original(compose_cfg):
    # train_own_forget_cl.py: lr_scheduler, _ = create_scheduler(args, OPTIMIZER) per task (timm cosine,
    # t_initial = epochs, --warmup-epochs 0, --warmup-lr 1e-6, --min-lr 1e-5), then
    # `for epoch in range(NUM_EPOCH): lr_scheduler.step(epoch); train_one_epoch(...)`
    schedule = dict(compose_cfg(["method=gslora", "data=casia100"]).trainer.schedule)
    assert schedule["step_after_epoch"] is False
    want = _timm_lrs_stepped_before_each_epoch(1e-2, warmup=0)
    got = epoch_lrs(schedule, 1e-2, 100)
    assert got == pytest.approx(want, rel=1e-12) and got[1] < got[0] == 1e-2
    after = epoch_lrs({**schedule, "step_after_epoch": True}, 1e-2, 100)
    assert after[1] == after[0] == 1e-2


class _StubLoop:
    """What ``_BestH`` reads from the loop: the tasks, the H reference and a tracker."""

    def __init__(self, reference: str) -> None:
        from types import SimpleNamespace

        task = ForgetTask(index=0, name="4-2", forget=(2, 3), remain=(0, 1), old=())
        self.protocol = SimpleNamespace(tasks=[task])
        self.method = SimpleNamespace(h_reference=reference)
        self.ctx = SimpleNamespace(tracker=SimpleNamespace(log_metrics=lambda *a, **k: None))
        self.pre_correct, self.pre_total = np.array([9, 9, 10, 10]), np.array([10, 10, 10, 10])

    h_reference_acc = ForgettingLoop.h_reference_acc


def test_h_drop_is_from_the_task_start_and_the_best_h_evaluation_is_kept():
    # engine_cl.py:evaluate: forget_drop = forget_acc_before - forget_acc (the task-start test accuracy),
    # Hmean = 2 * drop * remain_acc / (drop + remain_acc); a checkpoint whenever Hmean > highest (from 0)
    start = (np.array([8, 8, 6, 6]), np.array([10, 10, 10, 10]))  # Acc_r 80, Acc_f 60 at task start
    best = _BestH(_StubLoop("task_start"), 0, start)
    assert best.ref == pytest.approx(60.0)
    evals = [([7, 7, 3, 3], 100, 3), ([7, 7, 0, 0], 200, 6), ([5, 5, 0, 0], 300, 9)]
    for correct, step, epoch in evals:
        best.offer((np.array(correct), np.array([10] * 4)), step, epoch)
    assert best.n_evals == 3 and best.best is not None and (best.best.step, best.best.epoch) == (200, 6)
    assert best.best.h == pytest.approx(h_mean(70.0, 60.0, 0.0)) and best.best.counts[0].tolist() == [7, 7, 0, 0]
    pre = _BestH(_StubLoop("pretrain"), 0, start)
    assert pre.ref == pytest.approx(100.0)  # the pre-trained model's Acc_f instead


def test_torchvision_vit_b16_weights_give_torchvisions_logits(tmp_path):
    # train_own_forget_cl.py (-n VIT_B16): ModifiedViT(vit_b_16(weights=IMAGENET1K_V1)) -> heads(LN(CLS)),
    # the head cut to the ImageNet100 ids (util/utils.py:modify_head); inputs normalised with ImageNet mean/std
    from torchvision.models import vit_b_16

    torch.manual_seed(0)
    tv = vit_b_16(weights=None).eval()
    with torch.no_grad():  # torchvision zero-inits the head: give every tensor a visible value
        for name, p in tv.named_parameters():
            if name.endswith("bias") or "ln" in name or "heads" in name:
                p.add_(0.1 * torch.randn_like(p))
    state = tv.state_dict()
    torch.save(state, tmp_path / "vit_b_16.pth")
    ids = [7, 950, 3, 500]
    net = build_imagenet_vit(num_classes=4, class_ids=ids, weights=str(tmp_path / "vit_b_16.pth")).eval()
    assert [n for n, _ in net.named_modules() if n.endswith("mlp.fc1")][:1] == ["vit.blocks.0.mlp.fc1"]
    x = torch.rand(2, 3, 224, 224)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = tv.double()((x.double() - mean) / std)
        logits, emb = net.double()(x.double())
    torch.testing.assert_close(logits, ref[:, ids], atol=1e-5, rtol=0)
    assert emb.shape == (2, 768)
    # the pre-0.14 torchvision names of the MLP (mlp.linear_1 / linear_2) map to the same layers
    legacy = {k.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2."): v for k, v in state.items()}
    assert torchvision_to_timm(legacy).keys() == torchvision_to_timm(state).keys()
    with pytest.raises(ConfigError, match="not part of torchvision's vit_b_16"):
        torchvision_to_timm({**state, "heads.pre_logits.weight": torch.zeros(1)})


def test_timm_weights_still_load_and_normalisation_follows_the_weights(tmp_path, caplog):
    import timm
    from safetensors.torch import save_file

    arch = {"img_size": 16, "kwargs": {"patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2}}
    torch.manual_seed(0)
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, **arch["kwargs"])
    save_file(src.state_dict(), str(tmp_path / "timm.safetensors"))
    net = build_imagenet_vit(
        num_classes=2, class_ids=[3, 7], name="vit_tiny_patch16_224", weights=str(tmp_path / "timm.safetensors"), **arch
    ).eval()
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():  # a timm file: timm's own normalisation for the architecture (0.5 / 0.5 here)
        torch.testing.assert_close(net(x)[0], src((x - 0.5) / 0.5)[:, [3, 7]])
    with pytest.raises(ConfigError, match="is in timm format"):
        build_imagenet_vit(
            num_classes=2,
            class_ids=[3, 7],
            name="vit_tiny_patch16_224",
            weights=str(tmp_path / "timm.safetensors"),
            weights_format="torchvision",
            **arch,
        )
    scratch = build_imagenet_vit(num_classes=2, class_ids=[3, 7], name="vit_tiny_patch16_224", **arch)
    assert scratch.pixel_mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])  # the paper's weights'
    assert "pixel_mean" not in scratch.state_dict()
    own = build_imagenet_vit(num_classes=2, class_ids=[3, 7], name="vit_tiny_patch16_224", mean=[0.5] * 3, **arch)
    assert own.pixel_mean.flatten().tolist() == [0.5] * 3 and "overrides the weights' own mean" in caplog.text


def test_imagenet_transform_is_the_originals_without_normalisation():
    # train_own_forget_cl.py (imagenet100): Resize(256) -> CenterCrop(224) -> ToTensor -> Normalize on the PIL image;
    # Normalize moved into the model (it belongs to the weights)
    from torchvision import transforms as T

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 410, 3), dtype=np.uint8))
    want = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()])(image)
    torch.testing.assert_close(imagenet_transform(256, 224)(image), want, atol=1e-6, rtol=0)


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
        assert cfg.method.h_reference == "task_start" and cfg.method.report == "best_h"
        assert cfg.trainer.eval_every == 100 and cfg.trainer.schedule.step_after_epoch is False
        assert cfg.data.scenario.subset_per_task is True
    if cfg.method.name.startswith("gslora"):
        assert cfg.method.lora.r == 8 and cfg.method.lora.lora_alpha == 1 and cfg.method.alpha == 1e-4
    if cfg.data.name == "casia100":
        assert cfg.model.embed_dim == 512 and cfg.model.depth == 6 and cfg.model.head.s == 64.0


def test_cpu_profile_shrinks_the_face_run_but_the_command_line_wins(compose_cfg):
    ov = ["method=gslora", "data=casia100", "trainer.epochs=3"]
    cfg = compose_cfg(ov)
    apply_cpu_profile(cfg, explicit_override_keys(ov))
    assert cfg.trainer.epochs == 3 and cfg.model.embed_dim == 64 and cfg.method.bnd == 26.0
    assert cfg.data.scenario.first_classes == 17 and cfg.data.scenario.order_seed == 1337


def test_forgetting_method_refuses_another_protocol(compose_cfg):
    with pytest.raises(ConfigError, match="supports the protocols"):
        check_compatibility(compose_cfg(["method=gslora", "data=cddb_hard"]))


# -- the forgetting baselines and the paper presets ---------------------------------------------------
# Facts from bjzhb666/GS-LoRA at a92fb97: train/train_own_forget_cl.py, engine_cl.py, image_iter.py,
# baselines/{Lwftrain,DERtrain,SCRUBtrain}.py, util/{args,sgda_utils}.py, scripts/run_cl_forget*.sh.


def _method(compose_cfg, name: str, *extra: str):
    from omegaconf import OmegaConf

    from genattr.utils.instantiate import build

    cfg = compose_cfg([f"method={name}", "data=casia100", *extra])
    return build(
        cfg.method,
        model=OmegaConf.to_container(cfg.model, resolve=True),
        trainer=OmegaConf.to_container(cfg.trainer, resolve=True),
    ), cfg


def _task(net: torch.nn.Module, n: int = 12, index: int = 0, bs: int = 4):
    from torch.utils.data import TensorDataset

    from genattr.methods.forgetting.base import TaskData

    g = torch.Generator().manual_seed(index)
    x = torch.rand(n, 3, 16, 16, generator=g)
    y = torch.arange(n) % 3 + 2  # remaining classes 2, 3, 4
    remain = TensorDataset(x, y)
    forget = TensorDataset(torch.rand(n, 3, 16, 16, generator=g), torch.arange(n) % 2)
    return TaskData(
        index=index,
        forget_classes=(0, 1),
        remain_classes=(2, 3, 4),
        remain=remain,
        forget=forget,
        device=torch.device("cpu"),
        batch_size=bs,
        n_classes=5,
        eval_margin=True,
    )


def test_retrain_warms_up_for_5_epochs_and_trains_the_head_as_the_scripts(compose_cfg):
    # run_cl_forget.sh / run_cl_forget_image.sh "retrain": --lr 3e-4 --warmup-epochs 5 (--min-lr 1e-5,
    # timm --warmup-lr 1e-6); train_own_forget_cl.py re-creates the optimiser and timm cosine per task and
    # calls lr_scheduler.step(epoch) before each epoch; the rebuilt backbone has every parameter trainable.
    from genattr.methods.forgetting.loop import effective_schedule

    method, cfg = _method(compose_cfg, "retrain")
    assert method.lr == 3e-4 and method.train_head and method.paired is False and method.epoch_over == "remain"
    schedule = effective_schedule(cfg.trainer.schedule, method.schedule)
    assert schedule["warmup_epochs"] == 5 and cfg.trainer.schedule.warmup_epochs == 0  # the others keep 0
    want = _timm_lrs_stepped_before_each_epoch(3e-4, warmup=5)
    assert epoch_lrs(schedule, 3e-4, 100) == pytest.approx(want, rel=1e-12)
    assert want[0] == pytest.approx(1e-6) and want[4] < 3e-4
    assert method.resolved_init() == "scratch"  # the face ViT: a new ViT_face, random init
    method.model_cfg["_target_"] = "genattr.models.imagenet_vit.build_imagenet_vit"
    assert method.resolved_init() == "reset_ffn"  # VIT_B16: torchvision weights, fresh FFN Linears


def test_scrub_has_the_originals_super_epochs_and_constant_lr(compose_cfg):
    # util/args.py: --sgda_gamma 0.99 --sgda_alpha 0.001 --kd_T 2 --sgda_learning_rate 1e-4
    # --sgda_weight_decay 5e-4 --SCRUB_superepoch 10 --scrub_decay_epoch 100; config.py lr_decay_rate 0.1.
    # SCRUBtrain.py: for i in range(10): i < 5 -> a forget pass (max) then a remain pass (min); else a remain
    # pass (min, the only passes that evaluate); lr = sgda_adjust_learning_rate(superepoch * 15 + i) with
    # the epoch scheduler commented out; train_own_forget_cl.py: optim.Adam(lr, weight_decay).
    method, _ = _method(compose_cfg, "scrub")
    assert (method.gamma, method.alpha_kl, method.temperature, method.smoothing) == (0.99, 0.001, 2.0, 0.0)
    assert (method.lr, method.optimizer, method.weight_decay, method.msteps, method.super_epoch) == (
        1e-4,
        "adam",
        5e-4,
        5,
        10,
    )
    cosine = epoch_lrs({"warmup_epochs": 0, "warmup_lr": 1e-6, "min_lr": 1e-5, "step_after_epoch": False}, 1e-4, 100)
    plan = method.plan(cosine, 1e-4)  # SCRUB ignores the loop's cosine: it has no epoch scheduler
    want = []
    for superepoch in range(10):
        for i in range(10):
            epoch = superepoch * 15 + i
            lr = 1e-4 * 0.1 ** int(np.sum(epoch > np.asarray(100)))
            if i < 5:
                want.append(("forget", "max", False, lr))
            want.append(("remain", "min", i >= 5, lr))
    got = [(p.over, p.phase, p.evaluate, p.lr) for p in plan]
    assert [g[:3] for g in got] == [w[:3] for w in want] and len(got) == 150
    assert [g[3] for g in got] == pytest.approx([w[3] for w in want], rel=1e-12)
    assert sum(1 for w in want if w[3] < 1e-4) == 45  # super-epochs 8-10 at 1e-5
    assert len(method.super_ends) == 10 and max(method.super_ends) == 149


def test_scrub_losses_and_smoothing_average():
    from genattr.methods.forgetting.base import Batch
    from genattr.methods.forgetting.baselines import SCRUB, kd

    method = SCRUB(name="scrub", model={}, trainer={}, smoothing=0.1)
    net = tiny_vit()
    data = _task(net)
    module = method.begin_task(net, data)
    assert not any(p.requires_grad for n, p in module.named_parameters() if n.startswith("head."))
    xf, yf = data.forget.tensors
    xr, yr = data.remain.tensors
    batch = Batch(xr[:4], yr[:4], xf[:4], yf[:4], phase="max")
    loss, parts = method.loss(module, module, batch, 0, 0)
    module.eval()  # no dropout: compare with the hand-written terms
    method.teacher.eval()
    loss, _ = method.loss(module, module, batch, 0, 0)
    want = -kd(module(xf[:4], yf[:4])[0], method.teacher(xf[:4], yf[:4])[0], 2.0)
    assert loss.item() == pytest.approx(want.item(), abs=1e-6)  # the average starts equal to the model
    batch = Batch(xr[:4], yr[:4], xf[:4], yf[:4], phase="min")
    loss, _ = method.loss(module, module, batch, 0, 1)
    logits, t_logits = module(xr[:4], yr[:4])[0], method.teacher(xr[:4], yr[:4])[0]
    want = 0.99 * torch.nn.functional.cross_entropy(logits, yr[:4]) + 0.001 * kd(logits, t_logits, 2.0)
    assert loss.item() == pytest.approx(want.item(), abs=1e-6)
    # SGDA smoothing: AveragedModel(avg_fn = 0.9 avg + 0.1 p), updated after each super-epoch, first = copy
    method.plan([1e-4] * 20, 1e-4)
    first, second = sorted(method.super_ends)
    old = {n: p.detach().clone() for n, p in module.named_parameters()}
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
    method.end_epoch(module, 0, first - 1)  # not a super-epoch end: nothing happens
    assert method.n_averaged == 0 and torch.equal(method.swa["pos_embed"], old["pos_embed"])
    method.end_epoch(module, 0, first)
    assert method.n_averaged == 1 and torch.equal(method.swa["pos_embed"], module.pos_embed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
    method.end_epoch(module, 0, second)
    torch.testing.assert_close(method.swa["pos_embed"], module.pos_embed.detach() - 0.9)
    dist = sum(torch.linalg.vector_norm(p - method.swa[n]) for n, p in module.named_parameters())
    assert method.smooth(module).item() == pytest.approx(0.1 * dist.item(), rel=1e-6)
    restored = SCRUB(name="scrub", model={}, trainer={}, smoothing=0.1)
    restored.load_state_tensors(method.state_tensors())
    assert restored.n_averaged == 2 and torch.equal(restored.swa["pos_embed"], method.swa["pos_embed"])


def test_relabelling_is_the_originals_wrapper():
    # image_iter.py:CLDatasetWrapper: (label + randint(1, 100)) % len(classes), (label + 1) % len(classes)
    # where that equals the label; len(classes) = the forgotten classes of the task
    from genattr.methods.forgetting.baselines import FullFineTune

    method = FullFineTune(name="ft", model={}, trainer={})
    net = method.begin_task(tiny_vit(), _task(tiny_vit()))
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert frozen == {"head.weight"}  # train_own_forget_cl.py freezes the head (`loss` in the name) only
    method.n_classes, method.n_forget = 100, 3
    y = torch.tensor([0, 1, 2, 57, 99] * 400)
    new = method.relabel(y)
    assert new.min() >= 0 and new.max() < 3 and not torch.any(new[y < 3] == y[y < 3])
    assert set(new[y == 0].tolist()) == {1, 2} and set(new[y == 57].tolist()) == {0, 1, 2}


def test_lwf_distillation_of_the_original_is_identically_zero():
    # baselines/Lwftrain.py:L_old_kd_loss: softmax -> pow(1/T) -> log_softmax -> torch.log (NaN) -> nan = 0
    from genattr.methods.forgetting.baselines import kd, lwf_kd_original

    student = (torch.randn(6, 100) * 20).requires_grad_()
    teacher = torch.randn(6, 100) * 20
    term = lwf_kd_original(student, teacher, 2.0)
    term.backward()
    assert term.item() == 0.0 and torch.count_nonzero(student.grad) == 0
    assert kd(student, teacher, 2.0).item() > 0.0  # kd_loss=hinton is a real term


def test_der_loss_has_no_ce_on_the_current_remaining_batch(compose_cfg):
    # DERtrain.py: loss = CE(forget, relabelled) + DER_lambda * ||emb_r - emb_teacher||^2 (torch.norm of the
    # whole batch, squared) + DER_plus_lambda * CE(the next remaining batch of the prefetcher)
    from genattr.methods.forgetting.base import Batch

    method, _ = _method(compose_cfg, "derpp")
    assert (method.lr, method.lam, method.lam_plus) == (1e-3, 0.005, 0.005)
    plan = method.plan([1e-3] * 3, 1e-3)
    assert all(p.over == "forget" and p.paired and p.extra_remain for p in plan)
    method.lam_plus = 0.0
    assert not any(p.extra_remain for p in method.plan([1e-3], 1e-3))
    method.lam_plus = 0.005
    net = tiny_vit()
    data = _task(net)
    module = method.begin_task(net, data)
    module.eval()
    xf, yf = data.forget.tensors
    xr, yr = data.remain.tensors
    state = method.gen.get_state()
    yf_new = method.forget_labels(yf[:4])  # drawn on the global batch, before the processes take their rows
    method.gen.set_state(state)
    assert torch.equal(method.relabel(yf[:4]), yf_new) and not torch.equal(yf_new, yf[:4])
    batch = Batch(xr[:4], yr[:4], xf[:4], yf_new, extra=(xr[4:8], yr[4:8]))
    loss, _ = method.loss(module, module, batch, 0, 0)
    ce_f = torch.nn.functional.cross_entropy(module(xf[:4], yf_new)[0], yf_new)
    der = (module(xr[:4], yr[:4])[1] - method.teacher(xr[:4], yr[:4])[1]).flatten().norm() ** 2
    ce_next = torch.nn.functional.cross_entropy(module(xr[4:8], yr[4:8])[0], yr[4:8])
    assert loss.item() == pytest.approx((ce_f + 0.005 * der + 0.005 * ce_next).item(), rel=1e-5)


def test_importance_terms_accumulate_over_tasks_as_the_original(compose_cfg):
    # train_own_forget_cl.py: regularization_terms[task] = {importance, task_param} for every task (no
    # --online); get_reg_loss sums lambda * imp * (p - task_param)^2 over all of them. EWC importance:
    # grad^2 * len(samples) / len(loader) of the margin CE; MAS: |grad| / len(loader) of the mean squared
    # margin logits; both in eval mode.
    ewc, _ = _method(compose_cfg, "ewc")
    mas, _ = _method(compose_cfg, "mas")
    l2, _ = _method(compose_cfg, "l2")
    assert (ewc.lam, mas.lam, l2.lam, ewc.lr) == (10.0, 0.005, 0.1, 1e-4)
    assert ewc.epoch_over == "union" and ewc.online is False and ewc.importance_data == "original"
    for m in (ewc, mas):
        m.importance_data, m.trainer["num_workers"] = "budget", 0
    net = tiny_vit()
    data = _task(net, n=12, bs=12)  # one batch: the estimate is the batch gradient
    ref = tiny_vit()
    ref.eval()
    x, y = data.remain.tensors
    logits, _ = ref(x, y)
    grads = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, y), list(ref.parameters()))
    ewc.begin_task(net, data)
    name, g = next((n, g) for (n, p), g in zip(ref.named_parameters(), grads, strict=True) if n == "pos_embed")
    torch.testing.assert_close(ewc.terms[0][1][name], g.pow(2) * 12)
    assert not any(n.startswith("head.") for n in ewc.terms[0][0])
    mas.begin_task(tiny_vit(), data)
    logits, _ = ref(x, y)
    g_mas = torch.autograd.grad(logits.pow(2).mean(), ref.pos_embed)[0]
    torch.testing.assert_close(mas.terms[0][1]["pos_embed"], g_mas.abs())
    # a second task adds a term; the regulariser sums both
    with torch.no_grad():
        net.pos_embed.add_(0.5)
    ewc.begin_task(net, _task(net, n=12, index=1, bs=12))
    assert len(ewc.terms) == 2
    with torch.no_grad():
        net.pos_embed.add_(0.25)
    want = sum(
        (imp[n] * (p - anchor[n]).pow(2)).sum()
        for anchor, imp in ewc.terms
        for n, p in net.named_parameters()
        if n in anchor
    )
    assert ewc.regulariser(net).item() == pytest.approx(10.0 * want.item(), rel=1e-5)
    restored, _ = _method(compose_cfg, "ewc")
    restored.load_state_tensors(ewc.state_tensors())
    assert len(restored.terms) == 2 and torch.equal(restored.terms[1][1]["pos_embed"], ewc.terms[1][1]["pos_embed"])
    l2.begin_task(net, data)
    l2.online = True
    l2.begin_task(net, data)
    assert len(l2.terms) == 1 and l2.terms[0][1] is None  # --online keeps one term; L2's importance is ones


def _batch_loop(world: int = 1, rank: int = 0, method=None) -> ForgettingLoop:
    """A loop with just what drawing batches needs: the trainer settings, the process, the method."""
    from types import SimpleNamespace

    loop = ForgettingLoop.__new__(ForgettingLoop)
    loop.tr = {"batch_size": 4, "num_workers": 0, "drop_last": False}
    loop.acc = SimpleNamespace(num_processes=world, process_index=rank)
    loop.method = method or SimpleNamespace(forget_labels=lambda y: y)
    return loop


def test_the_loop_runs_each_pass_over_the_set_its_plan_names():
    from torch.utils.data import TensorDataset

    from genattr.methods.forgetting.base import EpochPlan

    loop = _batch_loop()
    remain = TensorDataset(torch.zeros(16, 1), torch.arange(16) % 4 + 10)
    forget = TensorDataset(torch.ones(8, 1), torch.arange(8) % 2)
    cycles = {"forget": loop._cycle(forget, 1), "remain": loop._cycle(remain, 2)}
    union = list(loop._batches(EpochPlan(lr=1.0, over="union"), remain, forget, cycles, 0))
    assert len(union) == 6 and sum(len(b.yf) + len(b.yr) for b in union) == 24  # the original's ConcatDataset
    assert all(bool((b.xf == 1).all()) and bool((b.xr == 0).all()) and (b.yr >= 10).all() for b in union)
    assert any(0 < len(b.yf) < 4 for b in union)  # mixed batches
    lwf = list(loop._batches(EpochPlan(lr=1.0, over="forget"), remain, forget, cycles, 0))
    assert len(lwf) == 2 and all(len(b.yf) == 4 and len(b.yr) == 4 and (b.yr >= 10).all() for b in lwf)
    der = list(loop._batches(EpochPlan(lr=1.0, over="forget", extra_remain=True), remain, forget, cycles, 0))
    assert all(b.extra is not None and not torch.equal(b.extra[1], b.yr) for b in der)
    alone = list(loop._batches(EpochPlan(lr=1.0, over="remain", paired=False, phase="min"), remain, forget, cycles, 0))
    assert len(alone) == 4 and all(len(b.yf) == 0 and b.phase == "min" for b in alone)
    with pytest.raises(ConfigError, match="runs over one of"):
        EpochPlan(lr=1.0, over="both")


@pytest.mark.parametrize(
    "entry",
    [
        dict(over="union"),
        dict(over="forget", extra_remain=True),
        dict(over="remain"),
        dict(over="remain", paired=False),
    ],
)
def test_every_process_trains_on_its_rows_of_the_same_global_batches(entry):
    # two processes draw the global batches of one process (same generators), the relabelling baselines' draw
    # is made on the global batch, and each process keeps a contiguous share of its rows; a batch with fewer
    # rows than processes (here the last remaining batch, 1 row) is trained whole by both
    from torch.utils.data import TensorDataset

    from genattr.methods.forgetting.base import EpochPlan
    from genattr.methods.forgetting.baselines import FullFineTune

    remain = TensorDataset(torch.arange(9.0)[:, None], torch.arange(9) % 4 + 10)
    forget = TensorDataset(100 + torch.arange(6.0)[:, None], torch.arange(6) % 3)
    plan = EpochPlan(lr=1.0, **entry)

    def draw(world: int, rank: int) -> list:
        method = FullFineTune(name="ft", model={}, trainer={})
        method.n_classes, method.n_forget = 100, 3
        method.gen.manual_seed(7)
        loop = _batch_loop(world, rank, method)
        cycles = {"forget": loop._cycle(forget, 1), "remain": loop._cycle(remain, 2)}
        return [b for k in range(3) for b in loop._batches(plan, remain, forget, cycles, k)]

    def shared(whole: torch.Tensor, p0: torch.Tensor, p1: torch.Tensor) -> None:
        if plan.over != "union" and len(whole) == 1:
            assert torch.equal(p0, whole) and torch.equal(p1, whole)
        else:
            assert torch.equal(torch.cat([p0, p1]), whole)
            assert abs(len(p0) - len(p1)) <= 1 or plan.over == "union"  # a mixed batch is shared out as one

    one, first, second = draw(1, 0), draw(2, 0), draw(2, 1)
    assert len(one) == len(first) == len(second) > 0
    for b, b0, b1 in zip(one, first, second, strict=True):
        for key in ("xr", "yr", "xf", "yf"):
            shared(getattr(b, key), getattr(b0, key), getattr(b1, key))
        if b.extra is not None:
            shared(b.extra[1], b0.extra[1], b1.extra[1])
    assert any(len(b.yr) == 1 for b in one) or plan.over == "forget"  # the whole-batch rule was exercised
    if plan.over != "remain" or plan.paired:
        assert any(not torch.equal(b.yf, forget.tensors[1][(b.xf[:, 0] - 100).long()]) for b in one)  # relabelled


def test_gradient_accumulation_is_refused_with_a_sentence():
    from types import SimpleNamespace

    from genattr.methods.forgetting.base import check_one_step_per_batch

    check_one_step_per_batch(SimpleNamespace(gradient_accumulation_steps=1))
    with pytest.raises(ConfigError, match="trainer.grad_accum=2"):
        check_one_step_per_batch(SimpleNamespace(gradient_accumulation_steps=2))


def test_training_loaders_keep_the_last_partial_batch_as_the_original():
    """``train_own_forget_cl.py`` builds train_loader_forget / train_loader_remain with ``drop_last=False``."""
    from torch.utils.data import TensorDataset

    loop = _batch_loop()
    ds = TensorDataset(torch.zeros(10, 1), torch.arange(10))
    assert [len(y) for _, y in loop._loader(ds, 0)] == [4, 4, 2]
    loop.tr["drop_last"] = True
    assert [len(y) for _, y in loop._loader(ds, 0)] == [4, 4]
    assert [len(y) for _, y in loop._loader(TensorDataset(torch.zeros(3, 1), torch.arange(3)), 0)] == [3]


# the scripts' recipe for each preset (scripts/run_cl_forget.sh "GS-LoRA" block of the 4-task section;
# scripts/run_cl_forget_image.sh "GS-LoRA" block); GS-LoRA = the block without --prototype
PRESETS = {
    "gslora_casia100": dict(data="casia100", beta=[0.2, 0.25, 0.25, 0.2], proto=None, ratio=0.1),
    "gslora_pp_casia100": dict(data="casia100", beta=[0.2, 0.25, 0.25, 0.2], proto=[0.01] * 4, ratio=0.1),
    "gslora_imagenet100": dict(data="imagenet100", beta=[0.2, 0.25, 0.25, 0.25], proto=None, ratio=0.05),
    "gslora_pp_imagenet100": dict(data="imagenet100", beta=[0.2, 0.25, 0.25, 0.25], proto=[0.05] * 4, ratio=0.05),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_gslora_presets_are_the_scripts_recipes(compose_cfg, preset):
    want = PRESETS[preset]
    cfg = compose_cfg([f"experiment={preset}"])
    check_compatibility(cfg)
    assert cfg.data.name == want["data"] and cfg.method.name == ("gslora_pp" if want["proto"] else "gslora")
    # -b 48 -e 100 --lr 1e-2 --warmup-epochs 0 --min-lr 1e-5 (--warmup-lr 1e-6, --weight-decay 0.05)
    assert (cfg.trainer.batch_size, cfg.trainer.epochs, cfg.trainer.optimizer.lr) == (48, 100, 1e-2)
    assert cfg.trainer.optimizer.weight_decay == 0.05 and cfg.method.lr is None
    assert (cfg.trainer.schedule.warmup_epochs, cfg.trainer.schedule.min_lr, cfg.trainer.schedule.warmup_lr) == (
        0,
        1e-5,
        1e-6,
    )
    # --lora_rank 8 --BND 105 --alpha 0.0001 (no --warmup_alpha) --cl_beta_list ...
    assert cfg.method.lora.r == 8 and cfg.method.lora.lora_alpha == 1 and cfg.method.bnd == 105.0
    assert cfg.method.alpha == 1e-4 and cfg.method.warmup_alpha.enabled is False
    assert list(cfg.method.beta) == want["beta"]
    # --num_tasks 4 --num_of_first_cls 80 --per_forget_cls 20 --data_ratio
    sc = cfg.data.scenario
    assert (sc.num_tasks, sc.first_classes, sc.per_task, sc.data_ratio, sc.few_shot) == (4, 80, 20, want["ratio"], None)
    assert cfg.method.prototype.enabled is bool(want["proto"])
    if want["proto"]:  # --prototype --cl_prof_list / --pro_f_weight; BND_pro 18, pro_r_weight 0 (defaults)
        assert list(cfg.method.prototype.weight) == want["proto"]
        assert cfg.method.prototype.bnd == 18.0 and cfg.method.prototype.r_weight == 0.0
    if want["data"] == "casia100":  # -n VIT --vit_depth 6 -head CosFace
        assert cfg.model.name == "vit_face_p8s8" and cfg.model.depth == 6 and cfg.model.head.s == 64.0
    else:  # -n VIT_B16 -r vit_b_16-c867db91.pth
        assert cfg.model.name == "vit_base_patch16_224" and cfg.model.pretrained is True


def test_pretrain_follows_train_own_schedule_and_keeps_the_best_test_weights(compose_cfg):
    # scripts/run_sub.sh: -b 480 -e 1200 --lr 3e-4 --warmup-epochs 10; train/train_own.py: --warmup-lr 1e-6
    # --min-lr 1e-5, lr_scheduler.step(epoch) before each epoch, VER_FREQ 20, save when accuracy > highest_acc
    from torch.utils.data import TensorDataset

    from genattr.methods.forgetting.pretrain import pretrain

    cfg = compose_cfg(["method=pretrain", "data=casia100"]).method
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.warmup_epochs, cfg.warmup_lr, cfg.min_lr) == (
        1200,
        480,
        3e-4,
        10,
        1e-6,
        1e-5,
    )
    assert (cfg.lr_schedule, cfg.select, cfg.eval_every) == ("epoch", "best_test", 20)
    torch.manual_seed(0)
    x, y = torch.rand(40, 3, 16, 16), torch.arange(40) % 5
    lrs: list[float] = []
    net = tiny_vit()
    picked = pretrain(
        net,
        TensorDataset(x, y),
        epochs=6,
        batch_size=8,
        lr=1e-3,
        warmup_epochs=2,
        lr_schedule="epoch",
        select="best_test",
        test=TensorDataset(x, y),
        eval_every=3,
        log_fn=lambda m, epoch: lrs.append(m["pretrain/lr"]),
    )
    want = epoch_lrs({"warmup_epochs": 2, "warmup_lr": 1e-6, "min_lr": 1e-5, "step_after_epoch": False}, 1e-3, 6)
    assert lrs == pytest.approx(want) and lrs[0] == pytest.approx(1e-6)
    assert picked["best_step"] % 3 == 0 and picked["best_test_acc_margin"] >= 0.0
    from genattr.methods.forgetting.pretrain import accuracy

    assert accuracy(net, TensorDataset(x, y), margin=True) == pytest.approx(picked["best_test_acc_margin"])


def test_importance_data_is_a_fresh_draw_then_the_whole_remaining_split(compose_cfg):
    # train_own_forget_cl.py: task 0 importance on randperm(len(remain))[:int(len * data_ratio)] (its own draw);
    # after task t, the importance for t + 1 on split_dataset(...)[0], the whole remaining train split
    from types import SimpleNamespace

    ewc, _ = _method(compose_cfg, "ewc")
    labels = np.repeat(np.arange(5), 20)
    train = SimpleNamespace(labels=labels, subset=lambda idx: np.asarray(idx))
    scenario = {"subset_seed": 3, "data_ratio": 0.1, "few_shot": None, "ratio_over_split": True}
    ewc.protocol = SimpleNamespace(missing=(4,), train=train, info={"scenario": scenario})
    data0, data1 = _task(tiny_vit(), index=0), _task(tiny_vit(), index=1)
    data0.remain_classes = data1.remain_classes = (2, 3, 4)
    first = ewc.importance_set(data0)
    assert len(first) == 4 and set(labels[first]) <= {2, 3}  # int(40 * 0.1); the missing class 4 has no image
    later = ewc.importance_set(data1)
    assert sorted(later.tolist()) == list(range(40, 80))
    ewc.importance_data = "budget"
    assert ewc.importance_set(data1) is data1.remain
