"""A synthetic pre-training set: the twin suite's stand-in for ImageNet weights.

LoRAX adapts a *pretrained* frozen backbone; a tiny backbone trained from scratch on
a few hundred twin images would not be a faithful stand-in. Classifying image
degradations on random content teaches low-level features (noise, sharpness, banding,
channel alignment, quantisation) as ImageNet pretraining does, without teaching any
generator fingerprint: no family below uses an operation of
:mod:`genattr.twins.fingerprints` (no checkerboard, grating, resampling, blur, repeated
tile or colour-statistics trace), content comes from :func:`~genattr.twins.content.random_style`
(never a twin domain's style), and every class redraws its parameters per group of
images. An ImageNet backbone does not know CDDB's generators either: each LoRA adapter
has to learn its task's fingerprint, and fine-tuning (replay) has to move the backbone.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np

from genattr.twins.content import gaussian_blur, random_style, render

Op = Callable[[np.ndarray], np.ndarray]

_CHUNK = 64


def _white_noise(x: np.ndarray, *, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return x + sigma * rng.normal(size=x.shape)


def _channel_noise(x: np.ndarray, *, channel: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Noise in one colour channel only: a local colour statistic."""
    y = x.copy()
    y[..., channel] += sigma * rng.normal(size=x.shape[:3])
    return y


def _channel_shift(x: np.ndarray, *, channel: int, shift: tuple[int, int]) -> np.ndarray:
    """Chromatic-aberration-like misalignment of one colour channel by a pixel."""
    y = x.copy()
    y[..., channel] = np.roll(x[..., channel], shift, axis=(1, 2))
    return y


def _block_offsets(x: np.ndarray, *, block: int, amp: float, rng: np.random.Generator) -> np.ndarray:
    """Compression-like blocking: a fresh random offset per ``block`` x ``block`` cell of every image."""
    n, h, w, _ = x.shape
    cells = rng.normal(size=(n, -(-h // block), -(-w // block), 1))
    return x + amp * cells.repeat(block, 1).repeat(block, 2)[:, :h, :w]


def _sharpen(x: np.ndarray, *, strength: float) -> np.ndarray:
    return x + strength * (x - gaussian_blur(x, 1.0))


def _impulse_noise(x: np.ndarray, *, frac: float, rng: np.random.Generator) -> np.ndarray:
    """Salt and pepper: a fraction of the pixels set to black or white."""
    hit = rng.uniform(size=(*x.shape[:3], 1)) < frac
    return np.where(hit, rng.integers(0, 2, size=(*x.shape[:3], 1)).astype(x.dtype), x)


def _posterize(x: np.ndarray, *, levels: int) -> np.ndarray:
    """Quantisation to ``levels`` grey levels per channel (banding in smooth regions)."""
    return np.round(x * levels) / levels


def _banding(x: np.ndarray, *, axis: int, amp: float, rng: np.random.Generator) -> np.ndarray:
    """Sensor-like streaks: a random (not periodic) offset per row (``axis=1``) or column (``axis=2``)."""
    off = amp * rng.normal(size=(x.shape[0], x.shape[axis]))
    return x + (off[:, :, None, None] if axis == 1 else off[:, None, :, None])


def _vignette(x: np.ndarray, *, amp: float) -> np.ndarray:
    """Lens fall-off: darkening towards the corners."""
    yy, xx = np.meshgrid(np.linspace(-1, 1, x.shape[1]), np.linspace(-1, 1, x.shape[2]), indexing="ij")
    return x * (1 - amp * (yy**2 + xx**2) / 2)[None, ..., None]


_SHIFTS = ((0, 1), (1, 0), (0, -1), (-1, 0), (1, 1))

# Class k + 1 is FAMILIES[k]: a builder drawing fresh parameters; class 0 is clean content.
FAMILIES: dict[str, Callable[[np.random.Generator], Op]] = {
    "white_noise": lambda rng: partial(_white_noise, sigma=rng.uniform(0.025, 0.05), rng=rng),
    "channel_noise": lambda rng: partial(
        _channel_noise, channel=int(rng.integers(3)), sigma=rng.uniform(0.03, 0.06), rng=rng
    ),
    "channel_shift": lambda rng: partial(
        _channel_shift, channel=int(rng.integers(3)), shift=_SHIFTS[int(rng.integers(len(_SHIFTS)))]
    ),
    "blocking": lambda rng: partial(
        _block_offsets, block=int(rng.choice([4, 8])), amp=rng.uniform(0.015, 0.035), rng=rng
    ),
    "sharpen": lambda rng: partial(_sharpen, strength=rng.uniform(0.4, 0.9)),
    "impulse_noise": lambda rng: partial(_impulse_noise, frac=rng.uniform(0.005, 0.015), rng=rng),
    "posterize": lambda rng: partial(_posterize, levels=int(rng.integers(6, 12))),
    "row_banding": lambda rng: partial(_banding, axis=1, amp=rng.uniform(0.015, 0.03), rng=rng),
    "column_banding": lambda rng: partial(_banding, axis=2, amp=rng.uniform(0.015, 0.03), rng=rng),
    "vignette": lambda rng: partial(_vignette, amp=rng.uniform(0.1, 0.25)),
}
CLASS_NAMES: tuple[str, ...] = ("clean", *FAMILIES)


def pretrain_set(n: int, *, image_size: int, seed: int, strength: float = 1.0) -> tuple[np.ndarray, np.ndarray, int]:
    """``n`` images (uint8 ``N x H x W x 3``), balanced int64 labels, and the class count.

    Content style is redrawn for every chunk of images so the backbone sees many
    domains; each class's parameters are redrawn per chunk too, so it learns the
    degradation *family* rather than one instance. ``strength`` scales every change as
    ``data.twin.strength`` scales the CDDB twin's fingerprints (1.0 = the amplitudes above):
    the tiny CPU backbone learns neither at 1.0 in a CPU step budget.
    """
    n_classes = len(CLASS_NAMES)
    families = list(FAMILIES.values())
    rng = np.random.default_rng([seed, 0x9E7])
    labels = rng.permutation(np.arange(n) % n_classes).astype(np.int64)
    images = np.empty((n, image_size, image_size, 3), np.uint8)
    for start in range(0, n, _CHUNK):
        crng = np.random.default_rng([seed, start])
        stop = min(start + _CHUNK, n)
        batch = render(crng, stop - start, image_size, random_style(crng))
        out = batch.copy()
        for cls in np.unique(labels[start:stop]):
            if cls == 0:
                continue
            idx = np.flatnonzero(labels[start:stop] == cls)
            x = batch[idx]
            y = families[cls - 1](crng)(x)
            scale = crng.uniform(0.75, 1.25, (len(idx), 1, 1, 1))
            out[idx] = x + (y - x) * (scale * strength)
        images[start:stop] = np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)
    return images, labels, n_classes
