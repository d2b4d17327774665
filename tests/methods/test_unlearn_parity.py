"""AbU parity with the original code (PeterWang512/AttributeByUnlearning @ 191b6bf, and the authors' feature
extraction in PeterWang512/FastGDA @ a85a6a3 / PeterWang512/GenDataAttribution @ ed044d0): the undamped update,
loss-sweep noise per (row, caption, t), the query pipeline used for Delta G, the weight subsets, the CLIP / DINO
image and CLIP text baselines with offline weights, the pixel baseline on decoded images, and independent
(from-scratch) leave-K-out retrains next to the coupled flag. Twin-sized and fast."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import save_file
from test_unlearn import UNET, _write_release

from genattr.config import apply_cpu_profile, explicit_override_keys
from genattr.data.mscoco import load_mscoco, read_train_captions
from genattr.methods.attribution.features import (
    FeatureTower,
    TextTower,
    image_similarity_scores,
    text_similarity_scores,
)
from genattr.methods.attribution.losses import keyed_noise, loss_sweep, noise_key
from genattr.methods.attribution.probe import QueryProbe, deltas
from genattr.methods.attribution.retrain_cache import RetrainCache
from genattr.methods.attribution.retrain_plan import build_plan
from genattr.methods.attribution.training import TrainRecipe, independent_seed, train_coupled, train_unet
from genattr.methods.attribution.unlearning import (
    diagonal_fisher,
    precondition,
    select_parameters,
    snapshot,
    unlearn,
)
from genattr.models.diffusion import build_diffusion, build_unet, decode_latents, generate, load_vae
from genattr.utils.errors import ConfigError, DataError
from genattr.utils.instantiate import build

#: a ViT small enough to build, save and run in well under a second
TINY_VIT = {"depth": 1, "embed_dim": 32, "num_heads": 2, "img_size": 32}


def _tiny(seed: int = 0):
    return build_diffusion(unet=UNET, scheduler={}, seed=seed)


def _data(n: int = 6, captions: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lat = rng.uniform(-1, 1, size=(n, 3, 8, 8)).astype(np.float32)
    return np.concatenate([lat, lat[..., ::-1]]), rng.normal(size=(n, captions, 3, 8)).astype(np.float32)


def _method(compose_cfg, overrides: list[str]):
    cfg = compose_cfg(["method=unlearn", "data=mscoco", *overrides])
    return build(cfg.method, model=OmegaConf.to_container(cfg.model), trainer=OmegaConf.to_container(cfg.trainer))


# -- the undamped update of mscoco/compute_influence.py ---------------------------------------------------------
def test_damping_defaults_to_zero_on_the_paper_config_and_the_twin(compose_cfg):
    ov = ["method=unlearn", "data=mscoco"]
    cfg = compose_cfg(ov)
    assert cfg.method.unlearn.damping == 0  # compute_influence.py: lr * grad / (fisher * len_dataset) / accum
    apply_cpu_profile(cfg, explicit_override_keys(ov))
    assert cfg.method.unlearn.damping == 0 and cfg.method.unlearn.alpha == 1e-3


def test_the_undamped_update_is_the_originals_formula():
    """mscoco/compute_influence.py: 625 micro-batches of 80 query copies, distinct timesteps (randperm) and fresh
    noise, F.mse_loss backpropagated into p.grad, then p += lr * p.grad / (fisher * N) / accum_steps."""
    m, (lat, txt) = _tiny(), _data()
    names = select_parameters(m.unet, "cross_attn_kv")
    fisher = diagonal_fisher(m, lat, txt, names, epochs=1, batch_size=12)
    x0, cond = torch.from_numpy(lat[0] * 0.5), torch.from_numpy(txt[0, 0] + 0.5)
    alpha, n, bs, accum = 0.05, 6, 40, 4
    before = snapshot(m, names)
    # the original's procedure, re-derived, with genattr's draws (one seeded stream: randperm, then randn)
    gen = torch.Generator().manual_seed(0)
    params = dict(m.unet.named_parameters())
    m.unet.zero_grad()
    ac = m.alphas_cumprod
    for _ in range(accum):
        t = torch.randperm(1000, generator=gen)[:bs]
        eps = torch.randn((bs, *x0.shape), generator=gen)
        a = ac[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0.expand(bs, -1, -1, -1) + (1 - a).sqrt() * eps
        F.mse_loss(m.unet(noisy, t, encoder_hidden_states=cond.expand(bs, -1, -1)).sample, eps).backward()
    expected = {k: before[k].double() + alpha * params[k].grad.double() / (fisher[k] * n) / accum for k in names}
    m.unet.zero_grad()
    unlearn(m, names, fisher, x0, cond, alpha=alpha, n_train=n, draws=bs * accum, batch_size=bs, damping=0.0, seed=0)
    for k in names:
        got = params[k].detach().double()
        torch.testing.assert_close(got, expected[k].float().double(), rtol=1e-5, atol=1e-7)
        assert not torch.equal(got, before[k].double())


def test_a_zero_fisher_entry_is_a_sentence_not_silent_inf_weights():
    m, (lat, txt) = _tiny(), _data()
    names = select_parameters(m.unet, "cross_attn_kv")
    fisher = diagonal_fisher(m, lat, txt, names, epochs=1, batch_size=12)
    g = {k: torch.ones_like(fisher[k]) for k in names}
    fisher[names[0]].view(-1)[0] = 0.0
    # what compute_influence.py would write into that weight: grad / (0 * N) = inf (nan where grad is 0 too)
    assert torch.isinf(g[names[0]] / (fisher[names[0]] * 6)).any()
    with pytest.raises(ConfigError, match=f"Fisher of {names[0]} has 1 zero entries .*damping>0"):
        precondition(g, fisher, 0.0)
    damped = precondition(g, fisher, 0.1)  # the flag: F + 0.1 mean(F) per tensor (FastGDA)
    assert all(torch.isfinite(v).all() for v in damped.values())
    ref = g[names[1]] / (fisher[names[1]] + 0.1 * fisher[names[1]].mean())
    torch.testing.assert_close(damped[names[1]], ref, rtol=0, atol=0)


# -- loss-sweep noise per (row, caption, t) (mscoco/compute_training_loss.py::collect_loss) ----------------------
def test_sweep_noise_is_one_draw_per_row_caption_and_timestep():
    """collect_loss repeats each latent num_captions * time_samples times and draws one randn per copy: every
    (row, caption, t) has its own noise. caption_noise=shared (genattr's earlier default) reuses (row, t)."""
    rows, caps, ts = [0, 1, 2], [0, 1, 2, 3, 4], [0, 50, 950]
    jobs = [(r, c, t) for r in rows for c in caps for t in ts]
    r, c, t = (list(x) for x in zip(*jobs, strict=True))
    own = keyed_noise(0, r, t, (3, 8, 8), c)
    shared = keyed_noise(0, r, t, (3, 8, 8))
    assert len({v.numpy().tobytes() for v in own}) == len(rows) * len(caps) * len(ts)
    assert len({v.numpy().tobytes() for v in shared}) == len(rows) * len(ts)
    assert noise_key(3, 5, 950) == noise_key(3, 5, 950, 0)  # caption 0 keeps the (row, t) key of earlier versions
    assert len({noise_key(0, row, tt, cap) for row in range(40) for cap in range(5) for tt in range(1000)}) == 200_000


def test_identical_captions_give_identical_losses_only_with_shared_noise():
    m, (lat, txt) = _tiny(), _data()
    txt[:, 1] = txt[:, 0]  # two copies of one caption: only the noise can tell them apart
    ts = [0, 250, 500, 750]
    both = loss_sweep(m, lat, txt, range(12), ts, seed=1)
    first = loss_sweep(m, lat, txt, range(12), ts, seed=1, captions=[0])
    assert not np.allclose(both, first, rtol=1e-6)  # the original: an independent eps for caption 1
    shared = loss_sweep(m, lat, txt, range(12), ts, seed=1, caption_noise="shared")
    np.testing.assert_allclose(shared, first, rtol=1e-6)
    assert np.array_equal(first, loss_sweep(m, lat, txt, range(12), ts, seed=1, captions=[0], caption_noise="shared"))
    for bs in (1, 300):  # batching never changes a loss, in either mode
        assert np.array_equal(both, loss_sweep(m, lat, txt, range(12), ts, seed=1, batch_size=bs))
        assert np.array_equal(
            shared, loss_sweep(m, lat, txt, range(12), ts, seed=1, batch_size=bs, caption_noise="shared")
        )
    with pytest.raises(ConfigError, match="caption_noise=per_image is unknown"):
        loss_sweep(m, lat, txt, range(2), ts, seed=1, caption_noise="per_image")


# -- weight subsets: the original's substring rule (mscoco/compute_influence.py, utils.py::check_substrings) -------
ORIGINAL_PATTERNS = {  # every group must match, any substring of a group suffices
    "cross_attn_kv": [["attn2"], ["to_k", "to_v"]],
    "cross_attn": [["attn2"]],
    "attn": [["attn"]],
    "all": [],
}


@pytest.mark.parametrize("subset", sorted(ORIGINAL_PATTERNS))
def test_weight_subsets_select_what_the_originals_substring_rule_selects(compose_cfg, subset):
    cfg = compose_cfg(["method=unlearn", "data=mscoco"])  # the MSCOCO UNet of the paper (57.4 M parameters)
    unet = build_unet(OmegaConf.to_container(cfg.model.unet))
    original = [
        n for n, _ in unet.named_parameters() if all(any(s in n for s in grp) for grp in ORIGINAL_PATTERNS[subset])
    ]
    assert select_parameters(unet, subset) == original
    if subset == "cross_attn_kv":
        assert len(original) == 32 and sum(dict(unet.named_parameters())[n].numel() for n in original) == 7_077_888


# -- Delta G: the query pipeline (mscoco/utils.py T2IWrapper + run_t2i_pipeline, mscoco/generate_samples.py) --------
def test_regeneration_defaults_are_the_query_pipeline(compose_cfg):
    """T2IWrapper: DDPMScheduler(num_train_timesteps=1000), clip_sample True, num_inference_steps=1000;
    run_t2i_pipeline: guidance_scale=7.5 against the empty prompt (classifier-free guidance)."""
    ov = ["method=unlearn", "data=mscoco"]
    cfg = compose_cfg(ov)
    regen = OmegaConf.to_container(cfg.method.evaluation.regen)
    assert regen == {"scheduler": "ddpm", "steps": 1000, "guidance_scale": 7.5}
    assert cfg.model.scheduler.clip_sample is True and cfg.model.scheduler.num_train_timesteps == 1000
    assert cfg.method.evaluation.clip_similarity is True
    apply_cpu_profile(cfg, explicit_override_keys(ov))
    assert cfg.method.evaluation.regen.steps == 100 and cfg.method.evaluation.regen.guidance_scale == 7.5


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_regeneration_uses_each_prompts_own_noise_and_guides_against_the_empty_prompt():
    m, (_, txt) = _tiny(), _data()
    cond, null = torch.from_numpy(txt[:3, 0]), torch.zeros(3, 8)
    kw = {"steps": 20, "guidance_scale": 7.5, "null_cond": null}
    a = generate(m, cond, _gens([1, 2, 3]), **kw)
    assert torch.equal(a, generate(m, cond, _gens([1, 2, 3]), **kw))  # fresh generators: the same samples
    sub = generate(m, cond[[2, 0]], _gens([3, 1]), **kw)  # another batch: each prompt's sample is unchanged
    torch.testing.assert_close(sub, a[[2, 0]], rtol=1e-5, atol=1e-5)
    other = generate(_tiny(seed=1), cond, _gens([1, 2, 3]), **kw)
    assert not torch.allclose(a, other)
    assert not torch.allclose(a, generate(m, cond, _gens([1, 2, 3]), steps=20, guidance_scale=1.0))
    assert not torch.allclose(a, generate(m, cond, _gens([1, 2, 3]), steps=10, guidance_scale=7.5, null_cond=null))
    # one step (t = 0, no ancestral noise): eps = eps(null) + 7.5 (eps(prompt) - eps(null)) on the initial noise
    x = torch.stack([torch.randn(3, 8, 8, generator=g) for g in _gens([1, 2, 3])])
    t0 = torch.zeros(3, dtype=torch.long)
    with torch.no_grad():
        e_u = m.unet(x, t0, encoder_hidden_states=null[None].expand(3, -1, -1)).sample
        e_c = m.unet(x, t0, encoder_hidden_states=cond).sample
    eps = e_u + 7.5 * (e_c - e_u)
    abar = m.alphas_cumprod[0]
    want = ((x - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1, 1)  # the x0 estimate, clipped (clip_sample)
    got = generate(m, cond, _gens([1, 2, 3]), steps=1, guidance_scale=7.5, null_cond=null)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match="empty prompt's embedding"):
        generate(m, cond, _gens([1, 2, 3]), steps=2, guidance_scale=7.5)


def test_delta_g_probe_is_deterministic_and_zero_against_itself(tmp_path):
    m, (lat, txt) = _tiny(), _data()
    qlat, qtxt = lat[:3], txt[:3, :1]
    tower = _tower(tmp_path, "clip")
    probe = QueryProbe(
        qlat,
        qtxt,
        [0, 2],
        time_samples=5,
        seed=4,
        num_train_timesteps=1000,
        regen={"scheduler": "ddpm", "steps": 8, "guidance_scale": 7.5},
        null_text=np.zeros((3, 8), np.float32),
        to_images=lambda x: x.clamp(-1, 1),
        clip=tower,
    )
    ref, again = probe.measure(m), probe.measure(m)
    d = deltas(ref, again)
    assert d["dl"].tolist() == [0.0, 0.0] and d["dg"].tolist() == [0.0, 0.0]
    np.testing.assert_allclose(d["dg_clip"], 1.0, rtol=1e-9)
    moved = deltas(ref, probe.measure(_tiny(seed=1)))
    assert (moved["dg"] > 0).all() and (moved["dg_clip"] < 1).all() and (moved["dg"] <= 1).all()


# -- CLIP / DINO feature baselines (FastGDA feature_extraction/extract_coco.py, GenDataAttribution models/) ---------
def test_feature_towers_are_the_papers_with_the_authors_preprocessing(compose_cfg):
    """CLIP: clip.load("ViT-B/32") encode_image (OpenAI, QuickGELU, 512-d), Resize(224) + CenterCrop(224), CLIP
    mean/std; DINO: torch.hub dino_vitb16 (CLS token), Resize(256, bicubic) + CenterCrop(224), ImageNet mean/std."""
    ov = ["method=unlearn", "data=mscoco"]
    cfg = compose_cfg(ov)
    feats = OmegaConf.to_container(cfg.method.features)
    assert (feats["clip"]["name"], feats["clip"]["resize"], feats["clip"]["crop"]) == (
        "vit_base_patch32_clip_quickgelu_224.openai",
        224,
        224,
    )
    assert (feats["dino"]["name"], feats["dino"]["resize"], feats["dino"]["crop"]) == (
        "vit_base_patch16_224.dino",
        256,
        224,
    )
    clip_cfg = timm.models.get_pretrained_cfg(feats["clip"]["name"])
    dino_cfg = timm.models.get_pretrained_cfg(feats["dino"]["name"])
    assert clip_cfg.mean == (0.48145466, 0.4578275, 0.40821073) and clip_cfg.std == (0.26862954, 0.26130258, 0.27577711)
    assert clip_cfg.num_classes == 512 and dino_cfg.num_classes == 0
    assert dino_cfg.mean == (0.485, 0.456, 0.406) and dino_cfg.std == (0.229, 0.224, 0.225)
    assert all(f["pretrained"] and f["weights"] is None for f in feats.values())
    assert {"clip", "dino"} <= set(cfg.method.baselines) and {"clip", "dino"} <= set(cfg.method.evaluation.methods)
    apply_cpu_profile(cfg, explicit_override_keys(ov))
    assert not cfg.method.features.clip.pretrained and cfg.method.features.dino.kwargs.img_size == 32


def _tower(tmp_path, key: str, seed: int = 0) -> FeatureTower:
    name = {"clip": "vit_base_patch32_clip_quickgelu_224.openai", "dino": "vit_base_patch16_224.dino"}[key]
    kwargs = {**TINY_VIT, "patch_size": 16}
    torch.manual_seed(seed)
    net = timm.create_model(name, pretrained=False, **kwargs)
    path = tmp_path / f"{key}_{seed}.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return FeatureTower(key, name=name, weights=str(path), pretrained=True, resize=32, crop=32, kwargs=kwargs)


@pytest.mark.parametrize("key", ["clip", "dino"])
def test_feature_baseline_loads_its_tower_from_weights_and_ranks_a_flipped_copy_first(tmp_path, key):
    tower = _tower(tmp_path, key)
    assert tower.source == "file"
    images = torch.from_numpy(_data(8)[0])  # 8 images, then their flips
    torch.manual_seed(0)
    again = timm.create_model(tower.name, pretrained=False, **{**TINY_VIT, "patch_size": 16}).eval()
    with torch.no_grad():
        want = F.normalize(again(tower.preprocess(images[:3])).double(), dim=1)
    torch.testing.assert_close(tower.embed(images[:3]), want)  # the file's weights, not a fresh init
    other = _tower(tmp_path, key, seed=1).embed(images[:3])
    assert not torch.allclose(other, want)
    query = images[8 + 5 : 8 + 6]  # the flipped copy of image 5
    scores = image_similarity_scores({key: tower.embed}, query, lambda a, b: images[a:b], 16, chunk=5)[key]
    assert scores.shape == (1, 8) and int(np.argmax(scores[0])) == 5
    assert scores[0, 5] == pytest.approx(1.0)


def test_a_hub_tower_offline_without_weights_is_an_immediate_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE=1 .*method.features.dino.weights="):
        FeatureTower("dino", name="vit_base_patch16_224.dino", pretrained=True)
    assert time.perf_counter() - t0 < 5
    with pytest.raises(ConfigError, match="method.features.clip.weights=.*nothing.safetensors does not exist"):
        FeatureTower(
            "clip", name="vit_base_patch32_clip_quickgelu_224.openai", weights=str(tmp_path / "nothing.safetensors")
        )


def test_images_need_a_decoder_and_guidance_needs_the_empty_prompt(compose_cfg, tmp_path):
    _write_release(tmp_path / "rel")
    protocol = load_mscoco(tmp_path / "rel")
    assert not protocol.pixel_space and protocol.vae is None and protocol.null_text is None
    with pytest.raises(ConfigError, match="method.baselines has \\['clip'\\].*data.vae"):
        _method(compose_cfg, ["method.baselines=[random,clip]"])._preflight(protocol)
    _method(compose_cfg, ["method.baselines=[random,pixel]"])._preflight(protocol)
    lko = ["method.baselines=[random]", "method.evaluation.enabled=true"]
    with pytest.raises(DataError, match="null_text_embedding.npy does not exist.*guidance_scale=7.5"):
        _method(compose_cfg, lko)._preflight(protocol)
    _method(compose_cfg, [*lko, "method.evaluation.regen.guidance_scale=1"])._preflight(protocol)
    np.save(tmp_path / "rel" / "null_text_embedding.npy", np.zeros((1, 3, 8), np.float32))
    assert load_mscoco(tmp_path / "rel").null_text.shape == (3, 8)
    np.save(tmp_path / "rel" / "null_text_embedding.npy", np.zeros((1, 4, 8), np.float32))
    with pytest.raises(DataError, match="expected the empty prompt's embedding \\(1, 3, 8\\)"):
        load_mscoco(tmp_path / "rel")


def _tiny_vae(folder):
    """A one-block diffusers VAE for 3-channel 8x8 latents (no downsampling), saved to ``folder``."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=3,
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        norm_num_groups=4,
        sample_size=8,
    )
    vae.save_pretrained(folder)
    return vae


def test_data_vae_decodes_the_release_latents(tmp_path):
    _write_release(tmp_path / "rel")
    vae = _tiny_vae(tmp_path / "vae")
    protocol = load_mscoco(tmp_path / "rel", vae=str(tmp_path / "vae"))
    loaded = load_vae(protocol.vae)
    lat = torch.from_numpy(np.array(protocol.train_latents[:4]))
    images = decode_latents(loaded, lat, batch_size=3)
    with torch.no_grad():  # latents are stored times the scaling factor: decode divides it out
        want = vae.decode(lat / vae.config.scaling_factor).sample.clamp(-1, 1)
    assert images.shape == (4, 3, 8, 8)
    torch.testing.assert_close(images, want)
    with pytest.raises(DataError, match="data.vae=.*is not a diffusers AutoencoderKL folder"):
        load_mscoco(tmp_path / "rel", vae=str(tmp_path))
    assert json.loads(json.dumps(protocol.info))["vae"] == str(tmp_path / "vae")


# -- pixel and CLIP-text baselines (paper App. B.3; FastGDA feature_extraction/extract_coco.py) ---------------------
#: OpenAI CLIP's tokens of these captions (openai/CLIP @ d05afc4 clip/simple_tokenizer.py through
#: clip.tokenize(..., truncate=True), run outside the project): what the original's text baseline embeds
CLIP_TOKENS = {
    "A man riding a wave on top of a surfboard.": [49406, 320, 786, 6765, 320, 4535, 525, 1253, 539, 320, 10176, 1972]
    + [269, 49407],
    "Two dogs'  playing   in the SNOW!!": [49406, 1237, 3255, 262, 1629, 530, 518, 2583, 748, 49407],
}
#: an open_clip ViT-B-32-quickgelu shrunk to build, save and run in well under a second
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
CLIP_TEXT = "open_clip:ViT-B-32-quickgelu.openai"


def _clip_text_file(tmp_path, seed: int = 0):
    import open_clip

    torch.manual_seed(seed)
    net = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None, **TINY_CLIP).eval()
    path = tmp_path / f"clip_text_{seed}.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return net, path


def test_clip_text_tower_tokenizes_as_openai_clip_and_embeds_with_the_files_weights(tmp_path, monkeypatch):
    net, path = _clip_text_file(tmp_path)
    tower = TextTower("clip_text", name=CLIP_TEXT, weights=str(path), kwargs=TINY_CLIP)
    assert tower.source == "file"
    for caption, ids in CLIP_TOKENS.items():
        tokens = tower.tokenizer([caption])[0]
        assert tokens[: len(ids)].tolist() == ids and not tokens[len(ids) :].any()
    long = tower.tokenizer(["x " * 100])[0]  # truncate=True: 77 tokens, the last forced to end-of-text
    assert long.shape == (77,) and long[0] == 49406 and long[-1] == 49407
    captions = ["a red square on grass", "a blue circle in the sky", "two dogs playing in the snow"]
    with torch.no_grad():
        want = F.normalize(net.encode_text(tower.tokenizer(captions)).double(), dim=1)
    torch.testing.assert_close(tower.embed(captions), want)
    other = TextTower("clip_text", name=CLIP_TEXT, weights=str(_clip_text_file(tmp_path, 1)[1]), kwargs=TINY_CLIP)
    assert not torch.allclose(other.embed(captions), want)
    scores = text_similarity_scores(tower, [" two dogs playing in the snow\n"], captions)
    assert scores.shape == (1, 3) and int(np.argmax(scores[0])) == 2 and scores[0, 2] == pytest.approx(1.0)
    bad = tmp_path / "bad.safetensors"
    save_file({"x": torch.zeros(1)}, str(bad))
    with pytest.raises(ConfigError, match="clip_text.weights=.*bad.safetensors is not an open_clip state dict"):
        TextTower("clip_text", name=CLIP_TEXT, weights=str(bad), kwargs=TINY_CLIP)
    with pytest.raises(ConfigError, match="clip_text.name=ViT-B-32 is not an open_clip model"):
        TextTower("clip_text", name="ViT-B-32", weights=str(path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="clip_text.pretrained=true .*HF_HUB_OFFLINE=1 .*clip_text.weights="):
        TextTower("clip_text", name=CLIP_TEXT, pretrained=True)


def test_training_captions_are_each_coco_images_first_annotation_in_image_order(tmp_path):
    """pycocotools COCO.createIndex: imgs keeps the order of "images" (the release's row order), imgToAnns[id]
    the order of "annotations"; FastGDA extract_coco.py takes imgToAnns[id][0], "" for an image without one."""
    coco = {
        "images": [{"id": 30}, {"id": 10}, {"id": 20}],
        "annotations": [
            {"image_id": 10, "id": 1, "caption": "ten first"},
            {"image_id": 30, "id": 2, "caption": "thirty"},
            {"image_id": 10, "id": 3, "caption": "ten second"},
        ],
    }
    path = tmp_path / "captions_train2017.json"
    path.write_text(json.dumps(coco))
    assert read_train_captions(path, 3) == ["thirty", "ten first", ""]
    with pytest.raises(DataError, match="captions for 3 images; the training set has 4"):
        read_train_captions(path, 4)
    (tmp_path / "junk.json").write_text('{"images": []}')
    with pytest.raises(DataError, match="junk.json is not a COCO caption-annotation JSON"):
        read_train_captions(tmp_path / "junk.json", 3)


def test_pixel_and_text_baselines_use_decoded_images_and_captions_and_say_so(compose_cfg, tmp_path, caplog):
    rel = tmp_path / "rel"
    _write_release(rel)  # 6 images; queries 0, 1 are training rows 0, 1
    _tiny_vae(tmp_path / "vae")
    tags: dict[str, str] = {}
    ctx = SimpleNamespace(
        tracker=SimpleNamespace(set_tags=tags.update), accelerator=SimpleNamespace(is_main_process=True)
    )
    m = _method(compose_cfg, ["method.baselines=[random,pixel,text]"])
    # neither a VAE nor captions: the latents and the model's own text embeddings, both warned about
    protocol = load_mscoco(rel)
    scores, towers, inputs = m._similarity_baselines(protocol, [0, 1], ctx, "cpu")
    assert inputs == {"pixel": "latents", "text": "encoder"} and towers == {}
    assert "pixel baseline on the release's latents" in caplog.text and "falls back to the model's own" in caplog.text
    latent_pixel = scores["pixel"]
    # data.vae and captions: the cosine of decoded [-1, 1] images, CLIP text of first caption vs prompt
    (rel / "sample_caption.txt").write_text("a cat on a mat\ntwo dogs in the snow\n")
    (rel / "train_captions.txt").write_text("a\nb\nc\ntwo dogs in the snow\ne\nf\n")
    protocol = load_mscoco(rel, vae=str(tmp_path / "vae"))
    assert protocol.train_captions == rel / "train_captions.txt"
    with pytest.raises(ConfigError, match="clip_text.pretrained=true .*HF_HUB_OFFLINE=1"):
        m._preflight(protocol)  # the paper's hub tower offline: an error before the Fisher
    weights = str(_clip_text_file(tmp_path)[1])
    m.features_cfg["clip_text"] = {**m.features_cfg["clip_text"], "weights": weights, "kwargs": TINY_CLIP}
    m._preflight(protocol)
    scores, towers, inputs = m._similarity_baselines(protocol, [0, 1], ctx, "cpu")
    assert inputs == {"pixel": "decoded_pixels", "text": "clip_text"} and towers["clip_text"]["weights"] == "file"
    assert tags["baseline_inputs.pixel"] == "decoded_pixels" and tags["features.clip_text"] == "file"
    vae = load_vae(protocol.vae)
    train = decode_latents(vae, torch.from_numpy(np.array(protocol.train_latents))).double().flatten(1)
    query = decode_latents(vae, torch.from_numpy(protocol.query_latents)).double().flatten(1)
    cos = (F.normalize(query, dim=1) @ F.normalize(train, dim=1).T).numpy()
    np.testing.assert_allclose(scores["pixel"], np.maximum(cos[:, :6], cos[:, 6:]), rtol=1e-9)
    assert scores["pixel"][0, 0] == pytest.approx(1.0) and not np.allclose(scores["pixel"], latent_pixel)
    assert scores["text"].shape == (2, 6) and int(np.argmax(scores["text"][1])) == 3


# -- leave-K-out retrains: from scratch (the paper's Eq. 1) or coupled (genattr's flag) -----------------------------
RECIPE = TrainRecipe(epochs=2, batch_size=4, lr=1e-3, seed=5)


def test_retrains_default_to_independent_and_the_cpu_profile_couples_them(compose_cfg):
    ov = ["method=unlearn", "data=mscoco"]
    cfg = compose_cfg(ov)
    assert cfg.method.evaluation.coupling == "independent" and cfg.method.text_baseline == "clip"
    assert cfg.method.features.clip_text.name == CLIP_TEXT and cfg.method.features.clip_text.pretrained
    apply_cpu_profile(cfg, explicit_override_keys(ov))
    assert cfg.method.evaluation.coupling == "coupled" and cfg.method.text_baseline == "encoder"
    with pytest.raises(Exception, match="method.evaluation.coupling=replay is unknown"):  # (Hydra wraps it)
        _method(compose_cfg, ["method.evaluation.coupling=replay"])


def test_independent_retrains_train_on_the_kept_rows_with_a_stream_of_their_own():
    lat, txt = _data(8)  # 8 images, 16 rows
    theta0 = train_coupled(_tiny(), lat, txt, RECIPE)
    coupled = train_unet(_tiny(), lat, txt, RECIPE, removed=[], coupling="coupled")
    assert all(torch.equal(theta0[k], v) for k, v in coupled.items())  # coupled: theta0 bit for bit
    fresh = train_unet(_tiny(), lat, txt, RECIPE, coupling="independent")
    assert any(not torch.equal(theta0[k], v) for k, v in fresh.items())  # from scratch: another run
    again = train_unet(_tiny(), lat, txt, RECIPE, coupling="independent")
    assert all(torch.equal(fresh[k], v) for k, v in again.items())  # the same removal, the same stream
    seeds = [independent_seed(5, r) for r in ([], [0], [1], [0, 1])]
    assert len(set(seeds)) == 4 and 5 not in seeds and independent_seed(5, [1, 0]) == seeds[3]
    bad = lat.copy()
    bad[[2, 10]] = np.nan  # both flips of image 2
    kept = train_unet(_tiny(), bad, txt, RECIPE, removed=[2], coupling="independent")
    assert all(torch.isfinite(v).all() for v in kept.values())  # its batches never hold a removed row
    weighted = train_unet(_tiny(), bad, txt, RECIPE, removed=[2], coupling="coupled")
    assert any(not torch.isfinite(v).all() for v in weighted.values())  # coupled still draws it (0 * nan)
    steps: list[int] = []
    train_unet(_tiny(), lat, txt, RECIPE, removed=[2], coupling="independent", on_log=lambda s, *_: steps.append(s))
    assert steps == [2 * (14 // 4)]  # an epoch is one pass over the 14 kept rows (coupled: 16 // 4 steps)


def test_retrain_cache_and_plan_keep_the_couplings_apart(tmp_path):
    lat, txt = _data(8)
    cfg = {"unet": UNET, "scheduler": {}, "seed": 0}
    cache = {c: RetrainCache(tmp_path, cfg, RECIPE, lat, txt, coupling=c) for c in ("independent", "coupled")}
    assert cache["independent"].key([1, 2]) != cache["coupled"].key([1, 2])
    assert cache["coupled"].init_cfg([1]) == cfg  # theta0's init
    assert cache["independent"].init_cfg([1])["seed"] == independent_seed(0, [1]) != independent_seed(0, [2])
    plan = build_plan(cache["independent"], [("random|0|1", [1])])
    assert plan["coupling"] == "independent" and plan["jobs"][0]["key"] == cache["independent"].key([1])
    # a bf16 retrain is another model: its own keys (fp32 keeps the keys of earlier versions) and plan precision
    acc = {p: SimpleNamespace(mixed_precision=p) for p in ("no", "bf16")}
    prec = {p: RetrainCache(tmp_path, cfg, RECIPE, lat, txt, coupling="coupled", accelerator=a) for p, a in acc.items()}
    assert prec["no"].key([1]) == cache["coupled"].key([1]) != prec["bf16"].key([1])
    assert build_plan(prec["bf16"], [("x", [1])])["mixed_precision"] == "bf16" and plan["mixed_precision"] == "no"
    theta0 = train_coupled(_tiny(), lat, txt, RECIPE)
    ref = cache["coupled"].model([]).unet.state_dict()
    assert all(torch.equal(theta0[k], v) for k, v in ref.items())  # the coupled reference is theta0
    fresh = cache["independent"].model([]).unet.state_dict()
    assert any(not torch.equal(theta0[k], v) for k, v in fresh.items())
    with pytest.raises(ConfigError, match="coupling=replay is unknown"):
        RetrainCache(tmp_path, cfg, RECIPE, lat, txt, coupling="replay")


def test_a_retrain_whose_write_fails_leaves_no_partial_file(tmp_path, monkeypatch):
    import genattr.methods.attribution.retrain_cache as retrain_cache

    def full_disk(state, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    lat, txt = _data(8)
    cache = RetrainCache(tmp_path, {"unet": UNET, "scheduler": {}, "seed": 0}, RECIPE, lat, txt, coupling="coupled")
    monkeypatch.setattr(retrain_cache, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        cache.model([1])
    assert not list(cache.folder.glob("*")), list(cache.folder.glob("*"))  # no .tmp, no half a retrain
