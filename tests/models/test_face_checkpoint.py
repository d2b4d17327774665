"""``model.weights`` reads GS-LoRA's released Face Transformer checkpoints.

The reference below is the original architecture re-derived (not copied) from bjzhb666/GS-LoRA
``vit_pytorch_face/vit_face.py`` (HEAD a92fb97; ``ViT_face`` with ``Residual`` / ``PreNorm`` /
``Attention`` / ``FeedForward`` / ``CosFace``) and loralib 0.1.2 ``Linear`` / ``MergedLinear``
(``lora_alpha`` 1, merged into ``weight`` on ``.eval()``). Its ``state_dict()`` is therefore a
file in the original layout, and genattr's ``FaceViT`` loaded through ``model.weights`` must
compute the same embeddings and CosFace logits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from genattr.models.face_checkpoint import original_names
from genattr.models.face_vit import FaceViT, build_face_vit
from genattr.utils.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CKPT = {"lora": "drop", "lora_alpha": 1}
# a small original-shaped model: the original's attention width is dim_head (64) x heads, so dim = 64 x heads
SMALL = dict(img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2, mlp_dim=256)
HEAD = {"s": 64.0, "m": 0.35}

# ---- the original layout (bjzhb666/GS-LoRA vit_pytorch_face/vit_face.py, ViT_face.state_dict()) ----
# top level: pos_embedding and cls_token are registered before patch_to_embedding; the CosFace head is `loss`
ORIGINAL_TOP_KEYS = [
    "pos_embedding",
    "cls_token",
    "patch_to_embedding.weight",
    "patch_to_embedding.bias",
    "mlp_head.0.weight",
    "mlp_head.0.bias",
    "loss.weight",
]
# per block i under transformer.layers.{i}.: [Residual(PreNorm(Attention)), Residual(PreNorm(FeedForward))],
# 11 tensors (qkv without bias; FeedForward.net = Linear, GELU, Dropout, Linear, Dropout)
ORIGINAL_BLOCK_KEYS = [
    "0.fn.norm.weight",
    "0.fn.norm.bias",
    "0.fn.fn.to_qkv.weight",
    "0.fn.fn.to_out.0.weight",
    "0.fn.fn.to_out.0.bias",
    "1.fn.norm.weight",
    "1.fn.norm.bias",
    "1.fn.fn.net.0.weight",
    "1.fn.fn.net.0.bias",
    "1.fn.fn.net.3.weight",
    "1.fn.fn.net.3.bias",
]
# --lora_rank r (lora_pos FFN, the default) adds 4 loralib tensors per block: 15 per block
ORIGINAL_FFN_LORA_KEYS = [
    "1.fn.fn.net.0.lora_A",
    "1.fn.fn.net.0.lora_B",
    "1.fn.fn.net.3.lora_A",
    "1.fn.fn.net.3.lora_B",
]


class RefLoRALinear(nn.Linear):
    """loralib ``Linear`` (``groups=1``) / ``MergedLinear`` (all groups enabled), ``lora_alpha`` 1."""

    def __init__(self, i: int, o: int, r: int = 0, *, bias: bool = True, groups: int = 1) -> None:
        super().__init__(i, o, bias=bias)
        self.r, self.groups, self.merged = r, groups, False
        if r:
            self.lora_A = nn.Parameter(torch.randn(r * groups, i) * 0.05)
            self.lora_B = nn.Parameter(torch.randn(o, r) * 0.05)  # non-zero: a trained adapter

    def _lora(self, x: torch.Tensor) -> torch.Tensor:
        # group g: x -> A_g -> B_g, written to output rows g (q, k, v for to_qkv)
        a, b = self.lora_A.chunk(self.groups), self.lora_B.chunk(self.groups)
        return torch.cat([(x @ ag.T) @ bg.T for ag, bg in zip(a, b, strict=True)], dim=-1) / self.r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        return out + self._lora(x) if self.r and not self.merged else out

    def train(self, mode: bool = True) -> RefLoRALinear:  # loralib: fold on eval(), unfold on train()
        super().train(mode)
        if self.r and self.merged == mode:
            with torch.no_grad():
                delta = self._lora(torch.eye(self.in_features)).T
                self.weight += -delta if mode else delta
            self.merged = not mode
        return self


class Residual(nn.Module):
    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + x


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm, self.fn = nn.LayerNorm(dim), fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float, r: int) -> None:
        super().__init__()
        inner = 64 * heads
        self.heads, self.scale = heads, dim**-0.5  # the quirk: model width, not head width
        self.to_qkv = RefLoRALinear(dim, inner * 3, r, bias=False, groups=3)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in self.to_qkv(x).chunk(3, dim=-1))
        attn = (q @ k.transpose(-1, -2) * self.scale).softmax(dim=-1)
        return self.to_out((attn @ v).transpose(1, 2).reshape(b, n, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float, r: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            RefLoRALinear(dim, hidden, r),
            nn.GELU(),
            nn.Dropout(dropout),
            RefLoRALinear(hidden, dim, r),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Transformer(nn.Module):
    def __init__(self, dim: int, depth: int, heads: int, mlp: int, dropout: float, r: int, pos: str) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    Residual(PreNorm(dim, Attention(dim, heads, dropout, r if pos == "Attention" else 0))),
                    Residual(PreNorm(dim, FeedForward(dim, mlp, dropout, r if pos == "FFN" else 0))),
                ]
            )
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn, ff in self.layers:
            x = ff(attn(x))
        return x


class RefCosFace(nn.Module):
    def __init__(self, dim: int, n: int, s: float = 64.0, m: float = 0.35) -> None:
        super().__init__()
        self.s, self.m = s, m
        self.weight = nn.Parameter(torch.empty(n, dim))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, emb: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        cos = F.linear(F.normalize(emb), F.normalize(self.weight))
        one_hot = torch.zeros_like(cos).scatter_(1, label.view(-1, 1), 1.0)
        return self.s * (one_hot * (cos - self.m) + (1.0 - one_hot) * cos)


class RefViTFace(nn.Module):
    """``ViT_face(loss_type='CosFace', pool='cls', channels=3, dropout=emb_dropout=0.1)``."""

    def __init__(
        self,
        *,
        n_classes: int,
        img_size: int,
        patch_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_dim: int,
        lora_rank: int = 0,
        lora_pos: str = "FFN",
    ) -> None:
        super().__init__()
        n, dim = (img_size // patch_size) ** 2, embed_dim
        self.p = patch_size
        self.pos_embedding = nn.Parameter(torch.randn(1, n + 1, dim))
        self.patch_to_embedding = nn.Linear(3 * patch_size**2, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.dropout = nn.Dropout(0.1)
        self.transformer = Transformer(dim, depth, num_heads, mlp_dim, 0.1, lora_rank, lora_pos)
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim))
        self.loss = RefCosFace(dim, n_classes)

    def forward(self, img: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, hh, ww = img.shape
        p = self.p
        # 'b c (h p1) (w p2) -> b (h w) (p1 p2 c)'
        x = img.reshape(b, c, hh // p, p, ww // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * c)
        x = self.patch_to_embedding(x)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + self.pos_embedding[:, : x.shape[1] + 1]
        x = self.transformer(self.dropout(x))
        emb = self.mlp_head(x[:, 0])
        return self.loss(emb, label), emb


def _reference(n_classes: int = 7, seed: int = 0, **kw) -> RefViTFace:
    torch.manual_seed(seed)
    arch = {**SMALL, **{k: v for k, v in kw.items() if k in SMALL}}
    ref = RefViTFace(n_classes=n_classes, **arch, **{k: v for k, v in kw.items() if k not in SMALL})
    with torch.no_grad():  # trained-looking norms, so a swapped norm would show
        for name, p in ref.named_parameters():
            if "norm" in name or "mlp_head" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
    return ref


def _save(state: dict[str, torch.Tensor], path: Path, prefix: str = "") -> Path:
    torch.save(OrderedDict((prefix + k, v.clone()) for k, v in state.items()), path)
    return path


def _load(path: Path, n_classes: int = 7, checkpoint: dict | None = None, **arch) -> FaceViT:
    return build_face_vit(
        num_classes=n_classes, weights=str(path), checkpoint=checkpoint or CKPT, head=HEAD, **{**SMALL, **arch}
    )


def _compare(net: FaceViT, ref: RefViTFace, atol: float = 1e-5) -> None:
    torch.manual_seed(1)
    img_size = net.patch_embed.img_size[0]
    x, y = torch.rand(4, 3, img_size, img_size), torch.tensor([0, 3, 6, 2]) % net.head.weight.shape[0]
    net.eval()
    with torch.no_grad():
        ref_logits, ref_emb = ref(x, y)
        logits, emb = net(x, y)
    torch.testing.assert_close(emb, ref_emb, atol=atol, rtol=0)
    torch.testing.assert_close(logits, ref_logits, atol=atol * 64, rtol=0)  # logits are s = 64 times a cosine


# ------------------------------------------------------------------------------------------------


def test_original_key_layout_per_block():
    ref = _reference(depth=3)
    keys = list(ref.state_dict())
    blocks = [f"transformer.layers.{i}.{s}" for i in range(3) for s in ORIGINAL_BLOCK_KEYS]
    assert keys == ORIGINAL_TOP_KEYS[:4] + blocks + ORIGINAL_TOP_KEYS[4:]
    assert sorted(original_names(3)) == sorted(keys)  # the converter's list, checked against the layout
    lora_keys = list(_reference(depth=2, lora_rank=8).state_dict())
    per_block = [k for k in lora_keys if k.startswith("transformer.layers.1.")]
    assert len(per_block) == 15 and [k for k in per_block if "lora" in k] == [
        f"transformer.layers.1.{s}" for s in ORIGINAL_FFN_LORA_KEYS
    ]
    with torch.device("meta"):  # the released depth-6 ViT-P8S8: 73 tensors, 19,157,504 parameters for 100 classes
        full = RefViTFace(n_classes=100, img_size=112, patch_size=8, embed_dim=512, depth=6, num_heads=8, mlp_dim=2048)
    sd = full.state_dict()
    assert len(sd) == 73 and sum(v.numel() for v in sd.values()) == 19_157_504
    assert sd["patch_to_embedding.weight"].shape == (512, 192) and sd["loss.weight"].shape == (100, 512)


@pytest.mark.parametrize("prefix", ["", "module."], ids=["plain", "data_parallel"])
def test_original_checkpoint_gives_the_reference_embeddings(tmp_path, prefix):
    ref = _reference().eval()
    path = _save(ref.state_dict(), tmp_path / "Backbone_VIT_Epoch_1185_checkpoint.pth", prefix)
    assert isinstance(torch.load(path, weights_only=True), OrderedDict)
    _compare(_load(path), ref)


def test_released_shape_checkpoint_gives_the_reference_embeddings(tmp_path):
    arch = dict(img_size=112, patch_size=8, embed_dim=512, depth=1, num_heads=8, mlp_dim=2048)
    ref = _reference(n_classes=100, **arch).eval()
    path = _save(ref.state_dict(), tmp_path / "released.pth", "module.")
    _compare(_load(path, n_classes=100, **arch), ref)


def test_loralib_checkpoint_saved_after_eval_keeps_its_merged_weights(tmp_path):
    """The original saves after .eval(): ``weight`` already holds (1/r) B@A, the lora keys are a record."""
    ref = _reference(lora_rank=8).eval()
    state = ref.state_dict()
    assert sum("lora_" in k for k in state) == 2 * 2 * SMALL["depth"]
    for prefix in ("", "module."):
        _compare(_load(_save(state, tmp_path / f"task{prefix}.pth", prefix)), ref)


@pytest.mark.parametrize("pos", ["FFN", "Attention"])
def test_loralib_checkpoint_saved_unmerged_is_merged_with_alpha_over_r(tmp_path, pos):
    ref = _reference(lora_rank=4, lora_pos=pos)  # train mode: weight without the adapter
    path = _save(ref.state_dict(), tmp_path / "unmerged.pth")
    fresh = _reference(lora_rank=4, lora_pos=pos, seed=5)
    fresh.load_state_dict(torch.load(path, weights_only=True))  # the original's load, then eval() folds B@A in
    fresh.eval()
    _compare(_load(path, checkpoint={"lora": "merge", "lora_alpha": 1}), fresh)
    with pytest.raises(AssertionError):  # drop reads the same file without the adapter: the flag matters
        _compare(_load(path), fresh)


def test_genattr_layout_still_loads(tmp_path):
    net = FaceViT(num_classes=7, **SMALL).eval()
    torch.save(net.state_dict(), tmp_path / "own.pth")
    loaded = _load(tmp_path / "own.pth").eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[1], net(x)[1])


def test_face_vit_layer_norms_and_embedding_init_are_the_originals():
    net = FaceViT(num_classes=3)
    norms = [m for m in net.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * 6 + 1 and all(m.eps == 1e-5 for m in norms)  # torch's default, as in vit_face.py
    assert 0.95 < net.pos_embed.std().item() < 1.05  # torch.randn
    assert net.pos_embed.abs().max() > 3.0  # not truncated
    timm_like = FaceViT(num_classes=3, embed_init="trunc_normal")
    assert timm_like.pos_embed.std().item() < 0.03
    with pytest.raises(ConfigError, match="model.embed_init"):
        FaceViT(num_classes=3, embed_init="zeros")


# ---- what does not fit is one sentence naming the file and what is missing ---------------------


def _one_sentence(err: pytest.ExceptionInfo, path: Path) -> str:
    msg = str(err.value)
    assert f"model.weights={path}" in msg and "\n" not in msg and msg.count(". ") == 0, msg
    return msg


def test_another_model_is_refused_naming_what_is_missing(tmp_path):
    import timm

    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet18", pretrained=False, num_classes=7).state_dict(), path)
    with pytest.raises(ConfigError) as err:
        _load(path)
    msg = _one_sentence(err, path)
    assert "neither a FaceViT nor an original vit_face" in msg and "and " in msg and "more" in msg


def test_an_incomplete_original_checkpoint_lists_the_missing_names(tmp_path):
    state = _reference().state_dict()
    del state["cls_token"], state["transformer.layers.1.1.fn.fn.net.3.weight"]
    path = _save(state, tmp_path / "cut.pth")
    with pytest.raises(ConfigError) as err:
        _load(path)
    msg = _one_sentence(err, path)
    assert "cls_token" in msg and "transformer.layers.1.1.fn.fn.net.3.weight" in msg


def test_head_depth_and_shape_mismatches_are_named(tmp_path):
    path = _save(_reference(n_classes=10).state_dict(), tmp_path / "casia_full.pth")
    with pytest.raises(ConfigError) as err:
        _load(path, n_classes=7)
    assert "10-way CosFace head" in _one_sentence(err, path) and "7 classes" in str(err.value)
    deep = _save(_reference(depth=3).state_dict(), tmp_path / "deep.pth")
    with pytest.raises(ConfigError) as err:
        _load(deep)
    assert "3 blocks, model.depth=2" in _one_sentence(err, deep)
    with pytest.raises(ConfigError) as err:
        _load(path, n_classes=10, mlp_dim=512)
    assert "blocks.0.mlp.fc1.weight" in _one_sentence(err, path)


def test_a_pickled_object_or_an_unknown_lora_mode_is_refused(tmp_path):
    path = tmp_path / "obj.pth"
    torch.save({"model": FaceViT(num_classes=2, **SMALL)}, path)
    with pytest.raises(ConfigError) as err:
        _load(path)
    assert "not a readable tensor state dict" in str(err.value)
    with pytest.raises(ConfigError, match="model.checkpoint.lora=both"):
        build_face_vit(num_classes=2, checkpoint={"lora": "both", "lora_alpha": 1}, head=HEAD, **SMALL)


# ---- end to end: launch.py on a CASIA-100-layout tree with a released-layout file --------------


def _casia_tree(root: Path, n_ids: int = 4, n_train: int = 4, n_test: int = 3) -> Path:
    """``<root>/{train,test}/<identity>/*.jpg`` at 112 px: one colour cast and pattern per identity plus noise."""
    rng = np.random.default_rng(0)
    casts = np.eye(3)[np.arange(n_ids) % 3] * 160 + (np.arange(n_ids) // 3)[:, None] * 60
    looks = [cast + rng.uniform(0, 95, size=(4, 4, 3)) for cast in casts]
    for split, n in (("train", n_train), ("test", n_test)):
        for k, look in enumerate(looks):
            folder = root / split / f"{k:07d}"
            folder.mkdir(parents=True)
            for j in range(n):
                base = np.kron(look, np.ones((28, 28, 1))) + rng.normal(0, 8, size=(112, 112, 3))
                Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(folder / f"{j:03d}.jpg", quality=95)
    return root


def _images(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    files = sorted((root / split).glob("*/*.jpg"))
    labels = sorted({f.parent.name for f in files})
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB")).copy()) for f in files])
    return x.permute(0, 3, 1, 2).float() / 255.0, torch.tensor([labels.index(f.parent.name) for f in files])


@pytest.mark.slow
@pytest.mark.parametrize("prefix", ["", "module."], ids=["plain", "data_parallel"])
def test_launch_gslora_on_casia100_layout_with_a_released_layout_checkpoint(tmp_path, prefix):
    tree = _casia_tree(tmp_path / "faces_webface_112x112_sub100_train_test")
    arch = dict(img_size=112, patch_size=8, embed_dim=128, depth=2, num_heads=2, mlp_dim=256)
    ref = _reference(n_classes=4, **arch).eval()
    with torch.no_grad():  # a backbone that tells the identities apart and a head that knows them
        ref.pos_embedding.mul_(0.02), ref.cls_token.mul_(0.02)
        x, y = _images(tree, "train")
        emb = ref(x, y)[1]
        ref.loss.weight.copy_(torch.stack([emb[y == c].mean(0) for c in range(4)]))
        xt, yt = _images(tree, "test")
        cos = F.linear(F.normalize(ref(xt, yt)[1]), F.normalize(ref.loss.weight))  # argmax without the margin
        hit = (cos.argmax(1) == yt).float()
    weights = _save(ref.state_dict(), tmp_path / "Backbone_VIT_Epoch_1185_checkpoint.pth", prefix)
    args = [
        "method=gslora",
        "data=casia100",
        f"data.root={tree}",
        f"model.weights={weights}",
        "trainer.mixed_precision=no",
        "method.eval_margin=false",  # plain argmax: a random backbone's identities are not 0.35 apart in cosine
        *[f"model.{k}={v}" for k, v in arch.items() if k != "img_size"],
        "data.scenario.num_tasks=1",
        "data.scenario.first_classes=3",
        "data.scenario.per_task=1",
        "data.scenario.data_ratio=1.0",
        "trainer.epochs=1",
        "trainer.batch_size=4",
        "trainer.num_workers=0",
        "tracking=none",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", GENATTR_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "checkpoint layout: vit_face" in out
    res = json.loads(next((tmp_path / "run").rglob("results.json")).read_text())
    row = res["tasks"][0]
    assert res["data_source"] == "real" and res["order"][3] == row["forget"][0]
    forget = torch.tensor(row["forget"])
    # the run starts from exactly the file's model: its task-start accuracies are the reference's
    assert hit.mean().item() > 0.9
    assert row["acc_f_start"] == pytest.approx(100.0 * hit[torch.isin(yt, forget)].mean().item())
    assert row["acc_r_start"] == pytest.approx(100.0 * hit[~torch.isin(yt, forget)].mean().item())
