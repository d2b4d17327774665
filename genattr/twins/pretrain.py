"""Synthetic pre-training sets: the twin suite's stand-in for ImageNet weights.

LoRAX adapts a *pretrained* frozen backbone; a tiny backbone trained from scratch on
a few hundred twin images would not be a faithful stand-in. ImageNet pretraining is
*semantic*: it classifies what an image shows, and an ImageNet backbone does not know
CDDB's generators, so each LoRA adapter has to learn its own task's fingerprint and
fine-tuning (replay) has to move the backbone. Two pretexts (``model.twin_pretrain.pretext``):

* ``content`` (the default): :data:`N_CONTENT_CLASSES` content families, each a style of
  :func:`~genattr.twins.content.random_style` (palette, shape vocabulary, texture scale)
  drawn from the recipe seed, never a twin domain's style; images of one class vary in
  layout, colours, gradient, stripes, texture and grain, as :func:`~genattr.twins.content.render`
  draws them. No image carries an added trace, so no feature learns "something was added".
* ``degradations``: clean content and ten image degradations (noise, banding, blocking,
  ...) that share no operation with :mod:`genattr.twins.fingerprints`. Kept as the
  measured counter-example (README, "The twin and the CPU profile"): it teaches a generic
  "artifact present" detector, so every new LoRA adapter fires on every earlier task's
  fakes too and LoRAX forgets more than replay.

Neither imports a fingerprint or a twin domain's style (``tests/data/test_cddb_data.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np

from genattr.twins.content import Style, gaussian_blur, random_style, render, to_uint8
from genattr.utils.errors import ConfigError

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

# Degradation class k + 1 is FAMILIES[k]: a builder drawing fresh parameters; class 0 is clean content.
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
DEGRADATION_CLASSES: tuple[str, ...] = ("clean", *FAMILIES)

#: Content families of the ``content`` pretext (a number of ImageNet-like "object classes" a tiny model can learn).
N_CONTENT_CLASSES = 16

PRETEXTS = ("content", "degradations")


def pretrain_set(
    n: int, *, image_size: int, seed: int, pretext: str, strength: float
) -> tuple[np.ndarray, np.ndarray, int]:
    """``n`` images (uint8 ``N x H x W x 3``), balanced int64 labels and the class count of ``pretext``.

    ``strength`` scales the ``degradations`` only (the ``content`` pretext adds nothing to scale).
    """
    if pretext == "content":
        return content_set(n, image_size=image_size, seed=seed)
    if pretext == "degradations":
        return degradation_set(n, image_size=image_size, seed=seed, strength=strength)
    raise ConfigError(f"model.twin_pretrain.pretext={pretext!r} is not a pretext; valid: {', '.join(PRETEXTS)}")


def content_styles(seed: int) -> list[Style]:
    """The styles of the content classes: drawn from the recipe seed, on a stream no twin domain uses."""
    return [random_style(np.random.default_rng([seed, 0xC047, k])) for k in range(N_CONTENT_CLASSES)]


def content_set(n: int, *, image_size: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """``n`` images of :data:`N_CONTENT_CLASSES` content families, balanced int64 labels, and the class count.

    A class is a style, not an image: every image is drawn afresh from its class's style, so the backbone
    learns what the families look like (colours, shapes, texture scale) and nothing about how pixels were made.
    """
    styles = content_styles(seed)
    rng = np.random.default_rng([seed, 0xC0])
    labels = rng.permutation(np.arange(n) % N_CONTENT_CLASSES).astype(np.int64)
    images = np.empty((n, image_size, image_size, 3), np.uint8)
    for start in range(0, n, _CHUNK):
        crng = np.random.default_rng([seed, 0xC1, start])
        stop = min(start + _CHUNK, n)
        out = np.empty((stop - start, image_size, image_size, 3), np.float32)
        for cls in np.unique(labels[start:stop]):
            idx = np.flatnonzero(labels[start:stop] == cls)
            out[idx] = render(crng, len(idx), image_size, styles[cls])
        images[start:stop] = to_uint8(out)
    return images, labels, N_CONTENT_CLASSES


def degradation_set(n: int, *, image_size: int, seed: int, strength: float) -> tuple[np.ndarray, np.ndarray, int]:
    """``n`` images (uint8 ``N x H x W x 3``) of the ``degradations`` pretext, balanced int64 labels, class count.

    Content style is redrawn for every chunk of images so the backbone sees many
    domains; each class's parameters are redrawn per chunk too, so it learns the
    degradation *family* rather than one instance. ``strength`` scales every change as
    ``data.twin.strength`` scales the CDDB twin's fingerprints (1.0 = the amplitudes above):
    the tiny CPU backbone learns neither at 1.0 in a CPU step budget.
    """
    n_classes = len(DEGRADATION_CLASSES)
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
        images[start:stop] = to_uint8(out)
    return images, labels, n_classes
