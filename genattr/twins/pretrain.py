"""A synthetic pre-training set: the twin suite's stand-in for ImageNet weights.

LoRAX adapts a *pretrained* frozen backbone; a tiny backbone trained from scratch on
a few hundred twin images would not be a faithful stand-in. Classifying randomly
parameterised artifact families on random content teaches low-level,
artifact-sensitive features that transfer to the twin's fingerprints without ever
seeing them: every class draws fresh parameters (period, frequency, colour, phase,
tile) per group of images, so no class equals one CDDB twin generator.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np

from genattr.twins.content import gaussian_blur, random_style, render
from genattr.twins.fingerprints import (
    Op,
    blur,
    checkerboard,
    grating,
    resample,
    tile_noise,
)

_CHUNK = 64


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.2, 1.0, 3)


def _white_noise(x: np.ndarray, *, sigma: float, rng: np.random.Generator) -> np.ndarray:
    return x + sigma * rng.normal(size=x.shape)


def _block_offsets(x: np.ndarray, *, block: int, amp: float, rng: np.random.Generator) -> np.ndarray:
    """Compression-like blocking: one random offset per ``block`` x ``block`` cell."""
    n, h, w, _ = x.shape
    cells = rng.normal(size=(n, -(-h // block), -(-w // block), 1))
    return x + amp * cells.repeat(block, 1).repeat(block, 2)[:, :h, :w]


def _sharpen(x: np.ndarray, *, strength: float) -> np.ndarray:
    return x + strength * (x - gaussian_blur(x, 1.0))


def _checker(rng: np.random.Generator, periods: list[int], axes: str = "xy") -> Op:
    period = int(rng.choice(periods))
    return partial(
        checkerboard,
        period=period,
        amp=rng.uniform(0.03, 0.07),
        colour=_colour(rng),
        phase=(int(rng.integers(period)), int(rng.integers(period))),
        axes=axes,
    )


def _lines(rng: np.random.Generator) -> Op:
    return _checker(rng, [2, 3, 4], axes=str(rng.choice(["x", "y"])))


def _grating(rng: np.random.Generator, lo: float, hi: float) -> Op:
    return partial(
        grating,
        freq=rng.uniform(lo, hi),
        angle=rng.uniform(0, 180),
        amp=rng.uniform(0.03, 0.06),
        colour=_colour(rng),
    )


def _channel_shift(x: np.ndarray, *, channel: int, shift: tuple[int, int]) -> np.ndarray:
    """Chromatic-aberration-like misalignment of one colour channel by a pixel."""
    y = x.copy()
    y[..., channel] = np.roll(x[..., channel], shift, axis=(1, 2))
    return y


def _channel_noise(x: np.ndarray, *, channel: int, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Noise in one colour channel only: a local colour statistic a CNN can see."""
    y = x.copy()
    y[..., channel] += sigma * rng.normal(size=x.shape[:3])
    return y


def _shifted_channel(rng: np.random.Generator) -> Op:
    shift = [(0, 1), (1, 0), (0, -1), (-1, 0), (1, 1)][int(rng.integers(5))]
    return partial(_channel_shift, channel=int(rng.integers(3)), shift=shift)


def _noisy_channel(rng: np.random.Generator) -> Op:
    return partial(
        _channel_noise,
        channel=int(rng.integers(3)),
        sigma=rng.uniform(0.03, 0.06),
        rng=rng,
    )


def _tile(rng: np.random.Generator) -> Op:
    size = int(rng.integers(3, 10))
    return partial(tile_noise, tile=rng.normal(size=(size, size, 3)), amp=rng.uniform(0.02, 0.045))


def _upsample(rng: np.random.Generator, factors: list[int], mode: str) -> Op:
    return partial(resample, factor=int(rng.choice(factors)), mode=mode)


# Class k + 1 is FAMILIES[k]: a builder drawing fresh parameters; class 0 is clean content.
FAMILIES: dict[str, Callable[[np.random.Generator], Op]] = {
    "checkerboard_p2": partial(_checker, periods=[2]),
    "checkerboard_p3": partial(_checker, periods=[3]),
    "checkerboard_p4_8": partial(_checker, periods=[4, 8]),
    "line_pattern": _lines,
    "grating_low": partial(_grating, lo=0.06, hi=0.16),
    "grating_high": partial(_grating, lo=0.2, hi=0.48),
    "channel_shift": _shifted_channel,
    "channel_noise": _noisy_channel,
    "blur": lambda rng: partial(blur, sigma=rng.uniform(0.5, 1.2)),
    "upsample_nearest": partial(_upsample, factors=[2, 3], mode="nearest"),
    "upsample_linear": partial(_upsample, factors=[2, 3, 4], mode="linear"),
    "fixed_pattern_noise": _tile,
    "white_noise": lambda rng: partial(_white_noise, sigma=rng.uniform(0.025, 0.05), rng=rng),
    "blocking": lambda rng: partial(
        _block_offsets,
        block=int(rng.choice([4, 8])),
        amp=rng.uniform(0.015, 0.035),
        rng=rng,
    ),
    "sharpen": lambda rng: partial(_sharpen, strength=rng.uniform(0.4, 0.9)),
}
CLASS_NAMES: tuple[str, ...] = ("clean", *FAMILIES)


def pretrain_set(n: int, *, image_size: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    """``n`` images (uint8 ``N x H x W x 3``), balanced int64 labels, and the class count.

    Content style is redrawn for every chunk of images so the backbone sees many
    domains; each class's parameters are redrawn per chunk too, so it learns the
    artifact *family* rather than one instance.
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
            out[idx] = x + (y - x) * scale
        images[start:stop] = np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)
    return images, labels, n_classes
