"""Synthetic twin of the MSCOCO attribution setting, written in the AbU release format.

Procedural captioned images (shape x colour x background at random position and size), a frozen random
text-embedding table as the text encoder (one token per attribute), and **planted concepts**: a unique
caption token carried by exactly ``per_concept`` images, each of which also shows that concept's own
stripe texture. The concepts are non-compositional (nothing else in the data carries the token or the
texture), so only their exemplars can teach them and they are the ground truth of queries that use the
token (``specs/unlearning.md`` 6.1, 6.3). Each image has one caption (MSCOCO has 5). A tiny UNet (theta0) is
trained on the set with the same coupled trainer the leave-K-out retrains use, and the queries are sampled
from theta0 (DDIM, fixed noise). Every
query's fidelity (the correlation of its texture with each concept's pattern) is in the manifest; with
``fidelity_gate: true`` only queries whose texture matches their own concept best enter
``query_ground_truth.json``. The gate is off by default: the CPU-sized theta0 renders blurry samples
(``specs`` 6.3) and the token, the cause by construction, is what the ground truth records.

The folder is a cache keyed by a hash of every setting (twin, model, trainer) and ``GENERATOR_VERSION``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from genattr.twins.cache import cached_twin
from genattr.twins.spec import Twin
from genattr.utils.errors import ConfigError

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2  # 2: writes null_text_embedding.npy
SHAPES = ("square", "circle", "triangle", "cross")
COLOURS = {
    "red": (1.0, -0.8, -0.8),
    "green": (-0.8, 0.9, -0.8),
    "blue": (-0.8, -0.6, 1.0),
    "yellow": (1.0, 1.0, -0.9),
    "magenta": (0.9, -0.9, 0.9),
    "white": (1.0, 1.0, 1.0),
}
BACKGROUNDS = {"dark": (-0.9, -0.9, -0.9), "grey": (-0.2, -0.2, -0.2), "sky": (-0.5, 0.0, 0.6)}
_SS = 4  # supersampling factor of the renderer


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    """Anti-aliased mask of one shape on a ``size`` x ``size`` grid (rendered at 4x, box-filtered)."""
    hi = size * _SS
    y, x = (np.mgrid[0:hi, 0:hi] + 0.5) / _SS
    dx, dy = x - cx, y - cy
    if shape == "square":
        m = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    elif shape == "circle":
        m = dx**2 + dy**2 <= r**2
    elif shape == "triangle":
        m = (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)
    else:  # cross
        w = max(r / 2.5, 0.5)
        m = ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    return m.reshape(size, _SS, size, _SS).mean((1, 3))


def concept_pattern(k: int, size: int, seed: int) -> np.ndarray:
    """Concept ``k``'s distinctive texture (3, size, size): oriented stripes in its own colour, zero mean."""
    rng = np.random.default_rng([seed, 7, k])
    theta = np.pi * (k / 4.0 + rng.uniform(0, 0.2))
    freq = rng.uniform(0.14, 0.2) * 8 / size  # about one and a half periods across the image
    phase = rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[0:size, 0:size]
    wave = np.sign(np.sin(2 * np.pi * freq * (x * np.cos(theta) + y * np.sin(theta)) + phase))
    colour = rng.normal(size=3)
    colour /= np.linalg.norm(colour)
    pat = colour[:, None, None] * wave[None]
    return (pat - pat.mean()).astype(np.float32)


def render(rng: np.random.Generator, shape: str, colour: str, bg: str, size: int) -> np.ndarray:
    """One image in [-1, 1], channels first."""
    img = np.broadcast_to(np.asarray(BACKGROUNDS[bg], np.float32)[:, None, None], (3, size, size)).copy()
    r = rng.uniform(0.22, 0.36) * size
    cx, cy = rng.uniform(r, size - r, size=2)
    m = _shape_mask(shape, size, cx, cy, r)[None]
    return img * (1 - m) + np.asarray(COLOURS[colour], np.float32)[:, None, None] * m


def _vocabulary() -> list[str]:
    return [*SHAPES, *COLOURS, *BACKGROUNDS, "plain"]


def _embed(table: np.ndarray, vocab: list[str], tokens: list[str]) -> np.ndarray:
    return np.stack([table[vocab.index(t)] for t in tokens]).astype(np.float32)


def _make_data(p: Mapping[str, Any]) -> dict[str, Any]:
    size, n, n_con, per = p["image_size"], p["n_images"], p["n_concepts"], p["per_concept"]
    rng = np.random.default_rng([p["seed"], 1])
    vocab = _vocabulary() + [f"concept{k}" for k in range(n_con)]
    table = rng.normal(size=(len(vocab), p["token_dim"])).astype(np.float32)
    planted = rng.permutation(n)[: n_con * per].reshape(n_con, per)
    concept_of = np.full(n, -1)
    for k, idx in enumerate(planted):
        concept_of[idx] = k
    patterns = [concept_pattern(k, size, p["seed"]) for k in range(n_con)]
    images, text, captions = [], [], []
    for i in range(n):
        attrs = [SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))]]
        attrs.append(list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))])
        img = render(rng, *attrs, size)
        token = "plain" if concept_of[i] < 0 else f"concept{concept_of[i]}"
        if concept_of[i] >= 0:
            img = img + p["concept_strength"] * patterns[concept_of[i]]
        images.append(np.clip(img, -1, 1))
        tokens = [*attrs, token]
        captions.append(" ".join(tokens))
        text.append(_embed(table, vocab, tokens)[None])  # one caption per image
    images = np.stack(images).astype(np.float32)
    latents = np.concatenate([images, images[..., ::-1]])  # N unflipped, then N flipped (the release layout)
    return {
        "latents": np.ascontiguousarray(latents),
        "text": np.stack(text),
        "captions": captions,
        "planted": planted,
        "patterns": np.stack(patterns),
        "table": table,
        "vocab": vocab,
    }


def _queries(p: Mapping[str, Any], data: dict[str, Any]) -> tuple[list[list[str]], np.ndarray, list[int]]:
    rng = np.random.default_rng([p["seed"], 2])
    prompts, concept = [], []
    for k in range(p["n_concepts"]):
        for _ in range(p["queries_per_concept"]):
            prompts.append(
                [
                    SHAPES[rng.integers(len(SHAPES))],
                    list(COLOURS)[rng.integers(len(COLOURS))],
                    list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
                    f"concept{k}",
                ]
            )
            concept.append(k)
    text = np.stack([_embed(data["table"], data["vocab"], t)[None] for t in prompts])
    return prompts, text, concept


def _fidelity(query: np.ndarray, patterns: np.ndarray) -> np.ndarray:
    """Correlation of the query (minus its per-channel mean) with each concept texture."""
    d = (query - query.mean((1, 2), keepdims=True)).ravel()
    pats = patterns.reshape(len(patterns), -1)
    return pats @ d / (np.linalg.norm(pats, axis=1) * max(np.linalg.norm(d), 1e-8))


def _build(out: Path, p: Mapping[str, Any], model_cfg: Mapping[str, Any], trainer: Mapping[str, Any]) -> dict:
    from genattr.methods.attribution.training import recipe_from_trainer, train_coupled
    from genattr.models.diffusion import build_diffusion, ddim_sample

    data = _make_data(p)
    np.save(out / "coco17_train_latents.npy", data["latents"])
    np.save(out / "coco17_train_text_embeddings.npy", data["text"])
    recipe = recipe_from_trainer(trainer)
    model = build_diffusion(**model_cfg)
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        state = train_coupled(model, data["latents"], data["text"], recipe)
    train_s = time.perf_counter() - t0
    save_file(state, str(out / "model.safetensors"))
    prompts, qtext, concept = _queries(p, data)
    size = p["image_size"]
    noise = torch.randn((len(prompts), 3, size, size), generator=torch.Generator().manual_seed(p["seed"] + 17))
    q = ddim_sample(model, torch.from_numpy(qtext[:, 0]), noise, steps=p["ddim_steps"]).numpy().astype(np.float32)
    np.save(out / "coco17_sample_latents.npy", q)
    np.save(out / "coco17_sample_text_embeddings.npy", qtext)
    # the empty prompt of the twin's text encoder (a lookup table has no tokens to look up): zero states,
    # which switch the cross-attention keys and values off; classifier-free guidance of Delta G uses it
    np.save(out / "null_text_embedding.npy", np.zeros((1, *qtext.shape[2:]), dtype=np.float32))
    (out / "sample_caption.txt").write_text("\n".join(" ".join(t) for t in prompts) + "\n")
    fid = [_fidelity(x, data["patterns"]) for x in q]
    ok = [int(np.argmax(f)) == c for f, c in zip(fid, concept, strict=False)]
    gated = [o or not p["fidelity_gate"] for o in ok]
    gt = {str(i): sorted(int(j) for j in data["planted"][c]) for i, c in enumerate(concept) if gated[i]}
    (out / "query_ground_truth.json").write_text(json.dumps(gt, indent=1))
    return {
        "params": dict(p),
        "model": dict(model_cfg),
        "trainer": recipe.as_dict(),
        "planted": {f"concept{k}": sorted(int(j) for j in idx) for k, idx in enumerate(data["planted"])},
        "queries": [
            {"prompt": " ".join(t), "concept": c, "fidelity": [round(float(v), 3) for v in f], "fidelity_ok": o}
            for t, c, f, o in zip(prompts, concept, fid, ok, strict=False)
        ],
        "train_seconds": round(train_s, 1),
        "train_captions": data["captions"],
    }


def ensure_mscoco_twin(
    cache_dir: str | Path,
    *,
    model: Mapping[str, Any],
    trainer: Mapping[str, Any],
    image_size: int = 8,
    n_images: int = 64,
    n_concepts: int = 4,
    per_concept: int = 4,
    queries_per_concept: int = 2,
    token_dim: int = 16,
    concept_strength: float = 0.6,
    ddim_steps: int = 50,
    fidelity_gate: bool = False,
    seed: int = 0,
) -> Path:
    """Return the twin folder for these settings, generating it (and training theta0) once."""
    if n_concepts * per_concept > n_images or min(n_concepts, per_concept, queries_per_concept) < 1:
        raise ConfigError(
            f"data.twin needs 1 <= n_concepts x per_concept <= n_images and queries_per_concept >= 1, got "
            f"{n_concepts} x {per_concept} of {n_images} and {queries_per_concept}"
        )
    unet = dict(model.get("unet", {}))
    if unet.get("cross_attention_dim") != token_dim or unet.get("in_channels") != 3:
        raise ConfigError(
            f"the MSCOCO twin needs model.unet.in_channels=3 and cross_attention_dim={token_dim} "
            f"(data.twin.token_dim), got {unet.get('in_channels')} and {unet.get('cross_attention_dim')}; "
            "keep the twin profile's model or set both"
        )
    params = {
        "image_size": int(image_size),
        "n_images": int(n_images),
        "n_concepts": int(n_concepts),
        "per_concept": int(per_concept),
        "queries_per_concept": int(queries_per_concept),
        "token_dim": int(token_dim),
        "concept_strength": float(concept_strength),
        "ddim_steps": int(ddim_steps),
        "fidelity_gate": bool(fidelity_gate),
        "seed": int(seed),
    }
    model_cfg = {k: v for k, v in dict(model).items() if k in ("unet", "scheduler", "init_seed")}
    model_cfg["seed"] = int(model_cfg.pop("init_seed", 0))
    key = {"params": params, "model": model_cfg, "trainer": dict(trainer), "version": GENERATOR_VERSION}

    def generate(tmp: Path) -> dict[str, Any]:
        log.warning("building the MSCOCO twin (training its theta0) into %s", tmp)
        return _build(tmp, params, model_cfg, trainer)  # its "params" entry is the twin's own settings

    return cached_twin(cache_dir, "mscoco_twin", key, generate)


def mscoco_twin(
    *, data: Mapping[str, Any], model: Mapping[str, Any], params: Mapping[str, Any], cache_dir: Path
) -> Twin:
    """``conf/data/mscoco.yaml`` ``twin._target_``: the release-format folder with a trained theta0.

    The twin's "latents" are pixels (``pixel_space``), so it needs no VAE and must not be given one.
    """
    if data.get("vae") is not None:
        raise ConfigError("data.vae is set but data.root is null: the twin's latents are pixels and need no VAE")
    root = ensure_mscoco_twin(cache_dir, **params)
    info = json.loads((root / "twin.json").read_text())
    return Twin(root=root, info=info, data={"files": {}}, protocol={"pixel_space": True})
