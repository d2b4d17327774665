"""Core maths of LoRAX and its baselines: adapter sizes, head growth, aux targets, herding,
the no-grad old-adapter path matching the original all-adapter backward, and batched experts
matching sequential passes."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from genattr.methods.continual.der import DERNet
from genattr.methods.continual.lorax import LoRAXNet
from genattr.methods.continual.memory import herding_order
from genattr.models.adapters import convit_lora_targets, lora_parameter_count
from genattr.models.heads import ExpandingHead
from genattr.utils.errors import ConfigError

LORA = {"r": 64, "lora_alpha": 16, "lora_dropout": 0.1, "bias": "none"}


def _tiny(**kw):
    return timm.create_model("convit_tiny", pretrained=False, num_classes=0, **kw)


def test_convit_tiny_adapter_has_the_paper_parameter_count():
    net = LoRAXNet(_tiny(), LORA, "gpsa_qk_v", False, "convit_tiny", experts="batched")
    net.begin_task(0, 2, aux_head=True)
    assert net.adapter_params == 614_400
    assert len(net.target_modules) == 20
    assert all(".attn.qk" in n or ".attn.v" in n for n in net.target_modules)
    trainable = sum(p.numel() for p in net.branch_parameters())
    assert trainable == 614_400


@pytest.mark.parametrize("name,dim", [("convit_small", 432), ("convit_base", 768)])
def test_paper_counts_for_small_and_base_on_meta_device(name, dim):
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=0)
    targets = convit_lora_targets(model, "gpsa_qk_v")
    assert lora_parameter_count(model, targets, 64) == 10 * 64 * 5 * dim


def test_intended_targets_are_wider_and_skip_patch_embed():
    model = _tiny()
    intended = convit_lora_targets(model, "intended")
    assert "patch_embed.proj" not in intended
    assert any(n.endswith("attn.qkv") for n in intended) and any(n.endswith("pos_proj") for n in intended)
    assert lora_parameter_count(model, intended, 64) > 614_400


def test_head_expansion_copies_old_block_only():
    torch.manual_seed(0)
    head = ExpandingHead()
    head.expand(4, 2)
    old_w, old_b = head.fc.weight.detach().clone(), head.fc.bias.detach().clone()
    head.expand(8, 4)
    assert torch.equal(head.fc.weight[:2, :4], old_w) and torch.equal(head.fc.bias[:2], old_b)
    assert torch.all(head.fc.bias[2:] == 0)  # new rows: fresh init, zero bias
    assert not torch.all(head.fc.weight[:2, 4:] == 0)  # old classes on new features: fresh, not zero


def test_aux_targets_map_old_to_zero_new_real_fake_to_one_two():
    net = LoRAXNet(_tiny(img_size=32, patch_size=8), LORA, "gpsa_qk_v", False, experts="batched")
    for t in range(3):
        net.begin_task(t, 2, aux_head=True)
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    assert net.aux_targets(y).tolist() == [0, 0, 0, 0, 1, 2]
    assert net.aux_head.out_features == 3 and net.head.fc.out_features == 6
    assert net.head.fc.in_features == 3 * net.feature_dim


def test_div_head_keeps_torch_default_init_and_der_aux_head_is_kaiming_zero_bias():
    """``reset_div_head`` in mit-ll/lorax_cil ``LoRAX/models/convit_lorax.py`` builds a plain ``nn.Linear(d, 3)``
    (bias uniform in +-1/sqrt(d)); DER's aux head (PyCIL ``SimpleLinear``) has a zero bias."""
    net = LoRAXNet(_tiny(img_size=32, patch_size=8), LORA, "gpsa_qk_v", False, experts="batched")
    for t in range(2):
        net.begin_task(t, 2, aux_head=True)
    bound = 1 / net.feature_dim**0.5
    bias = net.aux_head.bias.detach()
    assert bias.abs().max() <= bound and bias.abs().min() > 0
    torch.manual_seed(3)
    expected = torch.nn.Linear(net.feature_dim, 3)
    torch.manual_seed(3)
    assert torch.equal(net.new_aux_head(3).weight, expected.weight)
    der = DERNet(_tiny(img_size=32, patch_size=8))
    for t in range(2):
        der.begin_task(t, 2, aux_head=True)
    assert torch.all(der.aux_head.bias == 0)


def test_herding_picks_the_sample_closest_to_the_mean_first_and_is_deterministic():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(50, 8)) + 3.0
    order = herding_order(feats, 10)
    d = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    assert order[0] == int(np.argmax(d @ d.mean(0)))
    assert len(set(order.tolist())) == 10
    assert np.array_equal(order, herding_order(feats, 10))
    # the iteration cap leaves ranks unfilled: they are filled by a seeded shuffle
    capped = herding_order(feats, 30, max_iter=5)
    assert len(set(capped.tolist())) == 30 and np.array_equal(capped, herding_order(feats, 30, max_iter=5))


def _task_net(reference_grad: bool, experts: str = "batched", n_tasks: int = 3, **kw) -> LoRAXNet:
    torch.manual_seed(0)
    backbone = _tiny(img_size=32, patch_size=8, embed_dim=24, depth=4, local_up_to_layer=3, **kw)
    net = LoRAXNet(backbone, LORA, "gpsa_qk_v", reference_grad, experts=experts)
    for t in range(n_tasks):
        net.begin_task(t, 2, aux_head=True)
        with torch.no_grad():  # give every adapter non-zero B so old adapters matter
            for n, p in net.peft.named_parameters():
                if f"lora_B.task{t}" in n:
                    p.normal_(0, 0.02)
    return net


def test_no_grad_old_adapters_match_the_original_backward():
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([0, 3, 4, 5])
    losses, grads = [], []
    for ref in (False, True):
        net = _task_net(ref).eval()  # eval: no dropout, so both paths see identical maths
        out = net(x)
        loss = torch.nn.functional.cross_entropy(out["logits"], y)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in [*net.branch_parameters(), *net.head.parameters()]]))
        old_feats = net.branch_features(x)[:-1]
        # the original records (and back-propagates through) every old adapter's pass; we do not
        assert all(f.requires_grad == ref for f in old_feats)
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("n_tasks", [3, 4, 5])
def test_batched_experts_match_sequential_passes(n_tasks, monkeypatch):
    """One pass over T stacked copies gives every adapter's sequential features, in evaluation, in herding
    (training mode, no gradient: LoRA dropout on) and in training steps, with the same dropout masks,
    gradients and random stream afterwards."""
    batched_calls = []
    batched = LoRAXNet._batched
    monkeypatch.setattr(
        LoRAXNet, "_batched", lambda self, x, names: batched_calls.append(len(names)) or batched(self, x, names)
    )
    x = torch.randn(3, 3, 32, 32)
    y = torch.tensor([0, 2 * n_tasks - 2, 2 * n_tasks - 1])
    runs = {}
    for experts in ("sequential", "batched"):
        net = _task_net(False, experts, n_tasks)
        opt = torch.optim.SGD(net.trainable_parameters(), lr=0.5)
        torch.manual_seed(7)
        seen = []
        with torch.no_grad():
            seen.append(net.eval().features(x))
            seen += [net.train().features(x) for _ in range(2)]  # the first pass records the LoRA layer calls
        for _ in range(2):
            out = net.train()(x)
            loss = torch.nn.functional.cross_entropy(out["logits"], y)
            loss = loss + 0.1 * torch.nn.functional.cross_entropy(out["aux_logits"], net.aux_targets(y))
            opt.zero_grad()
            loss.backward()
            seen += [out["features"].detach(), loss.detach()]
            seen += [p.grad.clone() for p in net.trainable_parameters()]
            opt.step()
        seen.append(torch.get_rng_state())
        runs[experts] = seen
    # eval + herding (all T adapters), then two training steps (the T - 1 old ones)
    assert batched_calls == [n_tasks, n_tasks, n_tasks - 1, n_tasks - 1]
    for a, b in zip(runs["sequential"], runs["batched"], strict=True):
        assert a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6)
    # LoRA dropout was on (two herding passes differ), so equal features mean equal masks
    assert not torch.allclose(runs["batched"][1], runs["batched"][2], atol=1e-4)


def test_experts_option_is_checked():
    with pytest.raises(ConfigError, match="method.experts='fast'"):
        _task_net(False, "fast", 1)
    with pytest.raises(ConfigError, match="drop-path"):
        _task_net(False, "batched", 1, drop_path_rate=0.1)
    net = _task_net(False, "sequential", 3, drop_path_rate=0.1)  # sequential passes stay exact with drop-path
    assert len(net.branch_features(torch.randn(1, 3, 32, 32))) == 3


def test_der_new_branch_copies_previous_and_freezes_old():
    net = DERNet(_tiny(img_size=32, patch_size=8, embed_dim=24, depth=2, local_up_to_layer=1))
    net.begin_task(0, 2, aux_head=True)
    with torch.no_grad():
        next(net.branches[0].parameters()).add_(1.0)
    net.begin_task(1, 2, aux_head=True)
    a, b = net.branches
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not any(p.requires_grad for p in a.parameters()) and all(p.requires_grad for p in b.parameters())
    net.train()
    assert not a.training and b.training
