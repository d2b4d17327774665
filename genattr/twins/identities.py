"""SynthID: a synthetic twin of CASIA-100 and ImageNet100, written in their real layouts.

Each class ("identity") has its own look: three Gaussian blobs drawn from a *shared*
bank of 16 (colour, size) parts at class-specific positions, plus one of 8 shared
gratings. Because parts and gratings are shared, classes interfere, so forgetting one
class can damage others -- the property the GS-LoRA claims are about. Per-image jitter
(shifts, sizes, amplitudes, grating phase, gain, pixel noise) makes the task learnable
but not trivial. The images are written as PNG files in the CASIA layout
(``<root>/{train,test}/<id>/*.png``) or the ImageNet100 layout (``<root>/{train,test}/<wnid>/``
plus ``imagenet_folder_names.txt``) and then read by the real loaders.

The output is cached by a hash of the parameters and ``GENERATOR_VERSION``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from genattr.twins.cache import MANIFEST, cached_twin
from genattr.twins.spec import Twin, plain
from genattr.utils.errors import ConfigError

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
LAYOUTS = ("casia", "imagenet100")
CASIA_DIRNAME = "faces_webface_112x112_sub100_train_test"
FOLDER_NAMES_FILE = "imagenet_folder_names.txt"
N_PARTS, N_GRATINGS, BLOBS_PER_CLASS = 16, 8, 3


def _bank(seed: int) -> dict[str, np.ndarray]:
    """The shared parts and gratings every class draws from."""
    rng = np.random.default_rng([seed, 0xB4])
    return {
        "colour": rng.uniform(-1.0, 1.0, (N_PARTS, 3)),
        "sigma": rng.uniform(0.06, 0.16, N_PARTS),
        "freq": rng.uniform(2.0, 6.0, N_GRATINGS),
        "angle": rng.uniform(0.0, np.pi, N_GRATINGS),
        "gcolour": rng.uniform(-1.0, 1.0, (N_GRATINGS, 3)),
    }


def _class_look(seed: int, label: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, 0xC1, label])
    return {
        "parts": rng.choice(N_PARTS, BLOBS_PER_CLASS, replace=False),
        "pos": rng.uniform(0.2, 0.8, (BLOBS_PER_CLASS, 2)),
        "grating": rng.integers(N_GRATINGS, size=1),
    }


def render_class(
    rng: np.random.Generator, n: int, size: int, bank: dict[str, np.ndarray], look: dict[str, np.ndarray], noise: float
) -> np.ndarray:
    """``n`` images (``n x size x size x 3`` floats in [0, 1]) of one class."""
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    px = 1.0 / size
    shift = rng.normal(0, 1.5 * px, (n, 1, 2))
    pos = look["pos"][None] + shift + rng.normal(0, 1.0 * px, (n, BLOBS_PER_CLASS, 2))
    sig = bank["sigma"][look["parts"]][None] * rng.uniform(0.8, 1.25, (n, BLOBS_PER_CLASS))
    amp = rng.uniform(0.6, 1.4, (n, BLOBS_PER_CLASS))
    d2 = (yy[None, None] - pos[..., 0, None, None]) ** 2 + (xx[None, None] - pos[..., 1, None, None]) ** 2
    prof = amp[..., None, None] * np.exp(-d2 / (2 * sig[..., None, None] ** 2))  # n, b, H, W
    img = np.einsum("nbhw,bc->nhwc", prof, bank["colour"][look["parts"]]) * 0.35
    g = int(look["grating"][0])
    ang = bank["angle"][g] + rng.normal(0, 0.15, (n, 1, 1))
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    wave = np.sin(2 * np.pi * bank["freq"][g] * (np.cos(ang) * xx + np.sin(ang) * yy) + phase)
    img = img + 0.08 * wave[..., None] * bank["gcolour"][g]
    img = 0.5 + img * rng.uniform(0.7, 1.3, (n, 1, 1, 1))
    img = img + noise * rng.normal(size=img.shape)
    return np.clip(img, 0.0, 1.0)


def twin_folder_names(n: int = 1000) -> list[str]:
    """Deterministic fake WordNet ids standing in for the 1000 ImageNet folder names."""
    return [f"n{10_000_000 + 7_919 * i:08d}" for i in range(n)]


def _write(
    out: Path, *, layout: str, n_classes: int, n_train: int, n_test: int, image_size: int, seed: int, noise: float
) -> dict[str, Any]:
    bank = _bank(seed)
    if layout == "casia":
        names = [f"{k:07d}" for k in range(n_classes)]
        data_root = out / CASIA_DIRNAME
    else:
        all_names = twin_folder_names()
        step = len(all_names) // n_classes
        names = sorted(all_names[k * step] for k in range(n_classes))
        data_root = out
        (out / FOLDER_NAMES_FILE).write_text("\n".join(all_names) + "\n")
    for label, cls in enumerate(names):
        look = _class_look(seed, label)
        for split, n in (("train", n_train), ("test", n_test)):
            folder = data_root / split / cls
            folder.mkdir(parents=True)
            rng = np.random.default_rng([seed, label, 0 if split == "train" else 1])
            imgs = np.rint(render_class(rng, n, image_size, bank, look, noise) * 255).astype(np.uint8)
            for k, im in enumerate(imgs):
                Image.fromarray(im).save(folder / f"{k:04d}.png", compress_level=1)
    return {"classes": names, "root": str(data_root.relative_to(out))}


def ensure_identity_twin(
    cache_dir: str | Path,
    *,
    layout: str = "casia",
    n_classes: int = 20,
    n_train: int = 40,
    n_test: int = 20,
    image_size: int = 32,
    seed: int = 0,
    noise: float = 0.12,
) -> Path:
    """Return the data root of the twin (what ``data.root`` would be), generating it once."""
    if layout not in LAYOUTS:
        raise ConfigError(f"data.twin.layout={layout} is unknown; choose one of {list(LAYOUTS)}")
    if min(n_classes, n_train, n_test, image_size) < 1:
        raise ConfigError("data.twin needs positive n_classes, n_train, n_test and image_size")
    if layout == "imagenet100" and n_classes > 1000:
        raise ConfigError("data.twin.n_classes must be <= 1000 for the ImageNet100 layout")
    params = dict(
        layout=layout,
        n_classes=int(n_classes),
        n_train=int(n_train),
        n_test=int(n_test),
        image_size=int(image_size),
        seed=int(seed),
        noise=float(noise),
        version=GENERATOR_VERSION,
    )
    final = cached_twin(
        cache_dir,
        "identity_twin",
        params,
        lambda tmp: _write(tmp, **{k: v for k, v in params.items() if k != "version"}),
    )
    return final / json.loads((final / MANIFEST).read_text())["root"]


def identity_twin(
    *, data: Mapping[str, Any], model: Mapping[str, Any], params: Mapping[str, Any], cache_dir: Path
) -> Twin:
    """``conf/data/{casia100,imagenet100}.yaml`` ``twin._target_``: class folders in that dataset's layout."""
    return Twin(root=ensure_identity_twin(cache_dir, **params), info=plain(params))
