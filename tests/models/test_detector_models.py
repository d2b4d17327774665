"""The AI-GenBench detector backbones against the originals' models: the open_clip ViT-L/14
CommonPool tower (weights file, layout, offline errors), the CLIP head init, and the RN50 CLIP
embedding. Original: MI-BioLab/AI-GenBench @2332e50,
training_and_evaluation/algorithms/models/{openclip_models,openai_clip_image}.py."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from genattr.models import open_clip_towers
from genattr.models.detectors import Detector, build_detector
from genattr.utils.errors import ConfigError

SMALL = "ViT-S-32"  # open_clip's smallest built-in ViT (22.6 M image parameters): a real forward on CPU
COMMONPOOL = "open_clip:ViT-L-14.commonpool_xl_s13b_b90k"


def _one_sentence(err: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg and not re.search(r"[a-z)]\. [A-Z]", msg), msg  # no second sentence
    for n in needles:
        assert n in msg, (n, msg)
    return msg


@pytest.fixture(scope="module")
def small_clip(tmp_path_factory) -> tuple[nn.Module, dict[str, torch.Tensor], Path]:
    """A randomly initialised open_clip ViT-S-32 and its full state dict (open_clip layout) on disk."""
    torch.manual_seed(0)
    clip = open_clip.create_model(SMALL).eval()
    state = {k: v.contiguous() for k, v in clip.state_dict().items()}
    folder = tmp_path_factory.mktemp("open_clip")
    torch.save(state, folder / open_clip_towers.BIN_FILE)
    save_file(state, str(folder / open_clip_towers.SAFE_FILE))
    return clip, state, folder


# -- the open_clip tower ---------------------------------------------------------------------------
@pytest.mark.parametrize("file", [open_clip_towers.BIN_FILE, open_clip_towers.SAFE_FILE])
def test_a_release_file_gives_the_features_of_open_clips_encode_image(small_clip, file: str) -> None:
    # openclip_models.py OpenClipLinear.forward_features: backbone.encode_image(x, normalize=True)
    clip, _, folder = small_clip
    det = build_detector(
        name=f"open_clip:{SMALL}_probe",
        pretrained=False,
        weights=str(folder / file),
        features="embedding",
        normalize_features=True,
        head_init_std=0.02,
    )
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = clip.encode_image(x, normalize=True)
        got = nn.functional.normalize(det.backbone(x), dim=-1)
        logits = det(x)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert torch.allclose(logits, det.head(want).squeeze(-1), atol=1e-5)
    assert det.head.in_features == clip.visual.output_dim == 384


def test_tune_trains_the_original_parameter_set_and_pooled_drops_the_projection(small_clip) -> None:
    # OpenClipTune: self.backbone = backbone.visual (projection included, no extra bias; timm's
    # converted CLIP head would add a zero bias); next_to_last=True sets visual.proj = None
    clip, _, folder = small_clip
    det = build_detector(
        name=f"open_clip:{SMALL}_tune", pretrained=False, weights=str(folder / "open_clip_model.safetensors")
    )
    assert det.head.in_features == 384  # features=pooled: the pre-projection width
    assert det.backbone.proj is None
    det = build_detector(
        name=f"open_clip:{SMALL}_tune",
        pretrained=False,
        weights=str(folder / "open_clip_model.safetensors"),
        features="embedding",
    )
    own = {k.removeprefix("backbone.") for k in det.trainable_state() if k.startswith("backbone.")}
    assert own == set(clip.visual.state_dict())
    assert all(p.requires_grad for p in det.parameters())


def test_the_commonpool_config_builds_open_clips_vit_l14_with_the_published_size(compose_cfg) -> None:
    from genattr.utils.instantiate import build

    for mode in ("probe", "tune"):
        cfg = compose_cfg(["method=detector", "data=aigenbench", f"model=clip_vitl14_{mode}", "model.pretrained=false"])
        assert cfg.model.name == f"{COMMONPOOL}_{mode}"
        assert cfg.model.features == "embedding" and cfg.model.normalize_features and cfg.model.head_init_std == 0.02
    # the tag is the hub repo the original downloads (openclip_models.py dict_pretrain["clipL14commonpool"])
    pcfg = open_clip.get_pretrained_cfg("ViT-L-14", "commonpool_xl_s13b_b90k")
    assert pcfg["hf_hub"].rstrip("/") == "laion/CLIP-ViT-L-14-CommonPool.XL-s13B-b90K"
    with torch.device("meta"):
        det = build(cfg.model)
    tower = det.backbone
    # open_clip model_configs/ViT-L-14.json: width 1024, 24 layers, patch 14, 224 px, embed_dim 768
    w, layers, p, grid, e = 1024, 24, 14, 224 // 14, 768
    per_block = 12 * w * w + 13 * w  # ln_1, in_proj, out_proj, ln_2, c_fc, c_proj (weights + biases)
    n = 3 * p * p * w + w + (grid * grid + 1) * w + 4 * w + layers * per_block + w * e
    assert sum(t.numel() for t in tower.parameters()) == n == 303_966_208
    # mlfoundations/open_clip docs/model_profile.csv (@3b37473): ViT-L-14 image_mparams 303.97
    assert round(n / 1e6, 2) == 303.97
    shapes = {k: tuple(v.shape) for k, v in tower.state_dict().items()}
    assert len(shapes) == 4 + 4 + layers * 12  # conv1, class/pos embedding, proj; ln_pre/post; 12 per block
    assert shapes["conv1.weight"] == (w, 3, p, p) and shapes["positional_embedding"] == (257, w)
    assert shapes["proj"] == (w, e) and shapes["transformer.resblocks.23.attn.in_proj_weight"] == (3 * w, w)
    assert det.head.in_features == e


# -- head init ---------------------------------------------------------------------------------------
def test_head_weight_is_redrawn_and_the_bias_keeps_nn_linears_init() -> None:
    # openclip_models.py: self.fc = ChannelLinear(...) (an nn.Linear), then only
    # torch.nn.init.normal_(self.fc.weight.data, 0.0, 0.02); the bias keeps nn.Linear's U(-1/sqrt(d), 1/sqrt(d))
    torch.manual_seed(3)
    det = Detector(nn.Identity(), "tune", dim=768, head_init_std=0.02)
    torch.manual_seed(3)
    ref = nn.Linear(768, 1)
    nn.init.normal_(ref.weight, 0.0, 0.02)
    assert torch.equal(det.head.weight, ref.weight) and torch.equal(det.head.bias, ref.bias)
    assert det.head.bias.abs().item() > 0 and det.head.bias.abs().item() <= 768**-0.5
    torch.manual_seed(3)
    plain = Detector(nn.Identity(), "tune", dim=768)  # DINOv2 / RN50: nn.Linear's init for both
    torch.manual_seed(3)
    assert torch.equal(plain.head.weight, nn.Linear(768, 1).weight)


# -- wrong files and names ---------------------------------------------------------------------------
def _build(weights: Path, arch: str = SMALL) -> Detector:
    return build_detector(name=f"open_clip:{arch}_probe", pretrained=False, weights=str(weights), features="embedding")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_checkpoints_of_other_layouts_are_one_sentence_errors(small_clip, tmp_path: Path) -> None:
    _, state, _ = small_clip
    timm_file = tmp_path / "model.safetensors"  # timm's layout of a CLIP ViT
    save_file(
        {"patch_embed.proj.weight": torch.zeros(384, 3, 32, 32), "blocks.0.norm1.weight": torch.ones(384)},
        str(timm_file),
    )
    with pytest.raises(ConfigError) as err:
        _build(timm_file)
    _one_sentence(err, str(timm_file), "timm checkpoint")
    openai_file = tmp_path / "openai.pt"  # OpenAI's state dicts carry these next to the weights (clip/model.py)
    torch.save({**state, "input_resolution": torch.tensor(224), "context_length": torch.tensor(77)}, openai_file)
    with pytest.raises(ConfigError) as err:
        _build(openai_file)
    _one_sentence(err, "OpenAI CLIP checkpoint", "open_clip_pytorch_model.bin")
    jit_file = tmp_path / "ViT-L-14.pt"  # OpenAI's release files are TorchScript archives
    torch.jit.script(nn.Linear(2, 2)).save(str(jit_file))
    with pytest.raises(ConfigError) as err:
        _build(jit_file)
    _one_sentence(err, "TorchScript archive")
    pickled = tmp_path / "pickled.bin"
    torch.save({"visual.proj": Path("x")}, pickled)  # not loadable with weights_only=True
    with pytest.raises(ConfigError) as err:
        _build(pickled)
    _one_sentence(err, "weights-only")


def test_missing_keys_and_another_architecture_are_one_sentence_errors(small_clip, tmp_path: Path) -> None:
    _, state, folder = small_clip
    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in state.items() if k != "visual.proj"}, str(partial))
    with pytest.raises(ConfigError) as err:
        _build(partial)
    _one_sentence(err, "1 missing keys (e.g. proj)")
    with pytest.raises(ConfigError) as err:  # ViT-S-32-alt: same trunk, 256-d embedding
        _build(folder / open_clip_towers.SAFE_FILE, arch="ViT-S-32-alt")
    _one_sentence(err, "wrong shapes", "proj (384, 384) (expected (384, 256))")
    with pytest.raises(ConfigError, match="does not exist"):
        _build(tmp_path / "absent.bin")


def test_open_clip_names_are_checked_without_network() -> None:
    with pytest.raises(ConfigError) as err:
        build_detector(name="open_clip:ViT-Q-99_probe", pretrained=False)
    _one_sentence(err, "is not an open_clip model", "list_pretrained")
    with pytest.raises(ConfigError) as err:
        build_detector(name="open_clip:ViT-L-14.not_a_tag_probe", pretrained=False)
    _one_sentence(err, "commonpool_xl_s13b_b90k")  # the error lists the valid tags
    with pytest.raises(ConfigError) as err:
        build_detector(name="open_clip:ViT-L-14_probe", pretrained=True)
    _one_sentence(err, "needs a pretrained tag")


def test_offline_pretrained_without_a_cached_file_is_an_immediate_error(monkeypatch) -> None:
    asked: list[tuple[str, tuple[str, ...]]] = []

    def cached(repo: str, names) -> bool:
        asked.append((repo, tuple(names)))
        return False

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(open_clip_towers, "hub_file_cached", cached)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        build_detector(name=f"{COMMONPOOL}_probe", pretrained=True, features="embedding")
    assert time.perf_counter() - t0 < 10
    _one_sentence(err, "HF_HUB_OFFLINE=1", "model.weights", "laion/CLIP-ViT-L-14-CommonPool.XL-s13B-b90K")
    # the files open_clip would read, safetensors first (open_clip pretrained.py download_pretrained_from_hf)
    assert asked == [
        ("laion/CLIP-ViT-L-14-CommonPool.XL-s13B-b90K", ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))
    ]


def test_pretrained_online_downloads_the_commonpool_tag(monkeypatch) -> None:
    calls: list[tuple[str, dict]] = []

    def fake_create_model(arch: str, **kw):
        calls.append((arch, kw))
        raise RuntimeError("stop")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    with pytest.raises(RuntimeError, match="stop"):
        build_detector(name=f"{COMMONPOOL}_tune", pretrained=True, features="embedding")
    assert calls[0][0] == "ViT-L-14" and calls[0][1]["pretrained"] == "commonpool_xl_s13b_b90k"
    assert calls[0][1]["require_pretrained"] and "force_image_size" not in calls[0][1]


# -- RN50 CLIP -----------------------------------------------------------------------------------------
def test_timm_rn50_clip_gives_the_openai_rn50_embedding() -> None:
    # openai_clip_image.py: clip.load("RN50").visual, a ModifiedResNet (openai/CLIP clip/model.py, which
    # open_clip ships as open_clip/modified_resnet.py); rn50_clip_* use timm's conversion of its weights
    from open_clip.modified_resnet import ModifiedResNet
    from timm.models.byobnet import checkpoint_filter_fn

    torch.manual_seed(0)
    ref = ModifiedResNet(layers=(3, 4, 6, 3), output_dim=1024, heads=32, image_size=224, width=64)
    for m in ref.modules():  # non-trivial BatchNorm statistics, so a mixed-up BN shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(m.weight, 0.5, 1.5)
    ref.eval()
    det = build_detector(name="resnet50_clip.openai_probe", pretrained=False, features="embedding")
    state = checkpoint_filter_fn({f"visual.{k}": v for k, v in ref.state_dict().items()}, det.backbone)
    det.backbone.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = ref(x), det.backbone(x)
    assert got.shape == (2, 1024) and torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


# -- DINOv2: position embeddings as the torch.hub model interpolates them ------------------------------
# Original: MI-BioLab/AI-GenBench @2332e50 training_and_evaluation/algorithms/models/dinov2.py loads
# torch.hub facebookresearch/dinov2 dinov2_vitl14 (default branch; @b8931f7 checked):
# dinov2/hub/backbones.py _make_dinov2_model(img_size=518, patch_size=14, interpolate_antialias=False,
# interpolate_offset=0.1) and dinov2/models/vision_transformer.py interpolate_pos_encoding (the class
# token's row kept apart; the grid interpolated in float32, bicubic, scale_factor=(n + 0.1) / M, cast back).
def _cubic_weights(t: float, a: float = -0.75) -> list[float]:
    """Keys' cubic convolution kernel (a = -0.75, PyTorch's bicubic) at distances 1 + t, t, 1 - t, 2 - t."""

    def near(d: float) -> float:
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d: float) -> float:
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return [far(1 + t), near(t), near(1 - t), far(2 - t)]


def _resize_axis(v: torch.Tensor, axis: int, out: int, scale: float) -> torch.Tensor:
    """Bicubic along one axis, align_corners=False: output i samples input (i + 0.5) / scale - 0.5.

    The sample position is computed in float32 as PyTorch's kernels do (1 / scale times i + 0.5); in
    float64 it would move by up to ~4e-6 at 37 rows, which shows at 1e-6.
    """
    n = v.shape[axis]
    inv = np.float32(1.0 / scale)
    rows = []
    for i in range(out):
        src = float(inv * np.float32(i + 0.5) - np.float32(0.5))
        base = int(np.floor(src))
        w = _cubic_weights(float(np.float32(src - base)))
        taps = [v.select(axis, min(max(base - 1 + k, 0), n - 1)) for k in range(4)]  # edge rows repeat
        rows.append(sum(wk * tk for wk, tk in zip(w, taps, strict=True)))
    return torch.stack(rows, dim=axis)


def _hub_pos(pos: torch.Tensor, grid: int, offset: float = 0.1) -> torch.Tensor:
    """The hub's table for a ``grid`` x ``grid`` input, in float64: the class row, then the resampled grid."""
    m = int(round((pos.shape[1] - 1) ** 0.5))
    table = pos[0, 1:].double().reshape(m, m, -1)
    scale = (grid + offset) / m if offset else grid / m  # scale_factor=(n + offset) / M; size=n is the ratio n / M
    out = _resize_axis(_resize_axis(table, 0, grid, scale), 1, grid, scale)
    return torch.cat([pos[0, :1].double(), out.reshape(grid * grid, -1)])[None]


def _tiny_dinov2(mode: str = "tune", **kw) -> Detector:
    """A DINOv2-shaped timm ViT (patch 14, class token, LayerScale) with a 9x9 grid, fed 56 px (4x4)."""
    kw = {"pretrained": False, "input_size": 56} | kw
    kw["kwargs"] = {"depth": 1, "embed_dim": 16, "num_heads": 2, "img_size": 126} | kw.get("kwargs", {})
    return build_detector(name=f"vit_small_patch14_dinov2_{mode}", **kw)


def _wake(det: Detector) -> Detector:
    """Unit-scale position table and class token; LayerScale at 1 (its 1e-5 init hides the patches)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in det.backbone.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1.0)
            elif name in ("pos_embed", "cls_token"):
                p.normal_(0, 1.0)
    return det


def test_hub_interpolation_is_the_hubs_bicubic_at_scale_16_1_over_37() -> None:
    from genattr.models.vit_pos_embed import hub_interpolate

    # a table at a position table's scale: PyTorch's float32 kernel itself rounds at ~1.5e-6 on unit values
    pos = 0.1 * torch.randn(1, 1 + 37 * 37, 8, generator=torch.Generator().manual_seed(0))

    def interp(grid: int, offset: float = 0.1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return hub_interpolate(
            pos, (grid, grid), old_grid=(37, 37), num_prefix=1, offset=offset, antialias=False, dtype=dtype
        )

    got, want = interp(16), _hub_pos(pos, 16)
    assert got.shape == (1, 257, 8) and torch.equal(got[:, 0], pos[:, 0])
    assert torch.allclose(got.double(), want, atol=1e-6), (got.double() - want).abs().max()
    plain = _hub_pos(pos, 16, offset=0.0)  # size=16 would sample at 16/37: a different table
    assert (plain - want).abs().max() > 1e-3
    assert torch.allclose(interp(16, offset=0.0).double(), plain, atol=1e-6)
    assert interp(37) is pos  # the checkpoint's own grid: the parameter itself
    assert interp(16, dtype=torch.bfloat16).dtype == torch.bfloat16  # float32 maths, cast to the tokens' dtype


def test_hub_mode_trains_the_full_grid_and_forwards_as_the_hub_model() -> None:
    torch.manual_seed(0)
    det = _wake(_tiny_dinov2(pos_embed_resample="hub"))
    vit = det.backbone
    assert tuple(vit.pos_embed.shape) == (1, 1 + 9 * 9, 16) and vit.pos_embed.requires_grad
    assert tuple(det.trainable_state()["backbone.pos_embed"].shape) == (1, 82, 16)
    x = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    # the hub's forward: patches, class token in front, + the interpolated table, blocks, norm, class token
    tokens = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
    tokens = torch.cat([vit.cls_token.expand(3, -1, -1), tokens], dim=1) + _hub_pos(vit.pos_embed.detach(), 4).float()
    with torch.no_grad():
        want = vit.norm(vit.blocks(tokens))[:, 0]
        got = vit(x)
    assert got.shape == (3, 16) and torch.allclose(got, want, atol=1e-6), (got - want).abs().max()
    (det(x) ** 2).sum().backward()
    assert vit.pos_embed.grad is not None and (vit.pos_embed.grad[0].abs().sum(-1) > 0).all()  # all 82 rows learn


def test_timm_mode_resamples_once_at_load_with_antialias(tmp_path: Path) -> None:
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    hub = _wake(_tiny_dinov2(pos_embed_resample="hub"))
    file = tmp_path / "dinov2_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in hub.backbone.state_dict().items()}, str(file))
    tm = _tiny_dinov2(pos_embed_resample="timm", weights=str(file), kwargs={"img_size": 56})
    assert type(tm.backbone).__name__ == "VisionTransformer" and tuple(tm.backbone.pos_embed.shape) == (1, 17, 16)
    grid = hub.backbone.pos_embed.detach()
    assert torch.allclose(tm.backbone.pos_embed, resample_abs_pos_embed(grid, (4, 4), antialias=True), atol=1e-6)
    assert (tm.backbone.pos_embed.double() - _hub_pos(grid, 4)).abs().max() > 1e-2  # not the hub's table
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (tm.backbone(x) - hub.backbone(x)).abs().max() > 1e-4  # float noise here is ~1e-7
    with pytest.raises(RuntimeError, match=r"backbone.pos_embed has shape \(1, 17, 16\).*pos_embed_resample"):
        hub.load_trainable_state(tm.trainable_state())


def test_the_hubs_release_file_loads_without_resampling(tmp_path: Path) -> None:
    # dinov2_vitl14_pretrain.pth (what torch.hub loads): timm's keys plus the unused mask_token
    # (343 keys for ViT-L, counted on facebookresearch/dinov2 @b8931f7's DinoVisionTransformer)
    src = _wake(_tiny_dinov2(pos_embed_resample="hub")).backbone
    state = {k: v.clone() for k, v in src.state_dict().items()} | {"mask_token": torch.zeros(1, 16)}
    torch.save(state, tmp_path / "dinov2_tiny_pretrain.pth")
    det = _tiny_dinov2(pos_embed_resample="hub", weights=str(tmp_path / "dinov2_tiny_pretrain.pth"))
    assert torch.equal(det.backbone.pos_embed, src.pos_embed) and tuple(det.backbone.pos_embed.shape) == (1, 82, 16)
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(det.backbone(x), src(x))


def test_the_dinov2_configs_keep_the_37x37_grid_of_the_hub_model(compose_cfg) -> None:
    from genattr.models.vit_pos_embed import HubPosEmbedViT
    from genattr.utils.instantiate import build

    for mode in ("probe", "tune"):
        cfg = compose_cfg(
            ["method=detector", "data=aigenbench", f"model=dinov2_vitl14_{mode}", "model.pretrained=false"]
        )
        assert cfg.model.pos_embed_resample == "hub" and "img_size" not in cfg.model.kwargs
        assert cfg.model.hub_pos_offset == 0.1 and cfg.model.hub_pos_antialias is False and cfg.model.input_size == 224
        with torch.device("meta"):
            det = build(cfg.model)
            out = det(torch.empty(2, 3, 224, 224))
        vit = det.backbone
        assert isinstance(vit, HubPosEmbedViT) and out.shape == (2,)
        assert tuple(vit.patch_embed.grid_size) == (37, 37) and tuple(vit.pos_embed.shape) == (1, 1 + 37 * 37, 1024)
        assert vit.hub_pos_offset == 0.1 and vit.hub_pos_antialias is False
        assert vit.global_pool == "token" and vit.reg_token is None  # class token after the final norm; no registers
        assert vit.pos_embed.requires_grad == (mode == "tune")
        assert len(vit.state_dict()) + 1 == 343  # the hub model's keys less mask_token
    cfg = compose_cfg(
        [
            "method=detector",
            "data=aigenbench",
            "model=dinov2_vitl14_tune",
            "model.pretrained=false",
            "model.pos_embed_resample=timm",
        ]
    )
    with torch.device("meta"):
        det = build(cfg.model)
    assert type(det.backbone).__name__ == "VisionTransformer" and tuple(det.backbone.pos_embed.shape) == (1, 257, 1024)


def test_pos_embed_resample_misuse_is_a_one_sentence_error() -> None:
    with pytest.raises(ConfigError) as err:
        build_detector(name="test_resnet_tune", pretrained=False, pos_embed_resample="hub")
    _one_sentence(err, "model.pos_embed_resample=hub", "test_resnet")
    with pytest.raises(ConfigError) as err:
        _tiny_dinov2(pos_embed_resample="hub", input_size=60)
    _one_sentence(err, "model.input_size=60", "patch size 14")
    with pytest.raises(ConfigError) as err:
        _tiny_dinov2(pos_embed_resample="timm")  # kwargs.img_size=126, input 56
    _one_sentence(err, "model.kwargs.img_size=126")
    with pytest.raises(ConfigError) as err:
        _tiny_dinov2(pos_embed_resample="dynamic")
    _one_sentence(err, "expected hub, timm or null")
    with pytest.raises(ConfigError) as err:
        build_detector(name=f"open_clip:{SMALL}_probe", pretrained=False, pos_embed_resample="hub")
    _one_sentence(err, "open_clip")
