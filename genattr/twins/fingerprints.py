"""Generator fingerprints: the only thing that separates a twin's fakes from its reals.

Each family imitates a trace that real generators are known to leave: transposed-conv
checkerboards, spectral peaks, colour-statistics shifts, up-sampling / blur traces and
fixed-pattern noise. The patterns are anchored to the image grid (as in a real
generator) and periodic, so they survive a random crop and show up as peaks in a
shift-invariant spectrum. ``TRACES`` gives every CDDB task its own combination, so
distinct generators are also distinguishable from each other.

Operations take and return float ``(n, H, W, 3)`` arrays in [0, 1] (unclipped in
between); the caller clips and rounds to uint8 once at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

from genattr.twins.content import gaussian_blur, name_seed, resize_linear

Op = Callable[[np.ndarray], np.ndarray]


def _grid(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer pixel coordinates ``(yy, xx)`` of the image grid."""
    return np.meshgrid(np.arange(x.shape[1]), np.arange(x.shape[2]), indexing="ij")


def checkerboard(
    x: np.ndarray,
    *,
    period: int,
    amp: float,
    colour: Sequence[float],
    phase: tuple[int, int] = (0, 0),
    axes: str = "xy",
) -> np.ndarray:
    """Transposed-conv trace: a period-``period`` pattern scaled by the content."""
    yy, xx = _grid(x)
    pattern = np.ones(yy.shape)
    if "x" in axes:
        pattern = pattern * np.cos(2 * np.pi * (xx + phase[1]) / period)
    if "y" in axes:
        pattern = pattern * np.cos(2 * np.pi * (yy + phase[0]) / period)
    return x + amp * pattern[None, ..., None] * np.asarray(colour) * (0.5 + x)


def grating(x: np.ndarray, *, freq: float, angle: float, amp: float, colour: Sequence[float]) -> np.ndarray:
    """Spectral peak: a faint sinusoid at ``freq`` cycles/pixel, ``angle`` degrees."""
    yy, xx = _grid(x)
    rad = np.deg2rad(angle)
    wave = np.sin(2 * np.pi * freq * (np.cos(rad) * xx + np.sin(rad) * yy))
    return x + amp * wave[None, ..., None] * np.asarray(colour)


def colour_stats(
    x: np.ndarray,
    *,
    gain: Sequence[float] = (1.0, 1.0, 1.0),
    offset: Sequence[float] = (0.0, 0.0, 0.0),
    saturation: float = 1.0,
) -> np.ndarray:
    """Colour-pipeline trace: saturation change, then per-channel gain and offset."""
    grey = x.mean(-1, keepdims=True)
    return (grey + (x - grey) * saturation) * np.asarray(gain) + np.asarray(offset)


def resample(x: np.ndarray, *, factor: int, mode: str) -> np.ndarray:
    """Up-sampling trace: box-downsample by ``factor``, then nearest / linear upsample."""
    n, h, w, c = x.shape
    hp, wp = -(-h // factor) * factor, -(-w // factor) * factor
    padded = np.pad(x, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)), mode="edge")
    small = padded.reshape(n, hp // factor, factor, wp // factor, factor, c).mean((2, 4))
    if mode == "nearest":
        big = small.repeat(factor, 1).repeat(factor, 2)
    else:
        big = resize_linear(small, hp, wp)
    return big[:, :h, :w]


def blur(x: np.ndarray, *, sigma: float) -> np.ndarray:
    """Smoothness trace of generators that under-produce fine detail."""
    return gaussian_blur(x, sigma)


def tile_noise(x: np.ndarray, *, tile: np.ndarray, amp: float) -> np.ndarray:
    """Fixed-pattern noise: the same small random tile repeated over the whole image."""
    reps = (-(-x.shape[1] // tile.shape[0]), -(-x.shape[2] // tile.shape[1]), 1)
    return x + amp * np.tile(tile, reps)[None, : x.shape[1], : x.shape[2]]


def fixed_tile(key: str, size: int) -> np.ndarray:
    """A zero-mean, unit-std ``(size, size, 3)`` tile that belongs to ``key`` forever."""
    tile = np.random.default_rng(name_seed("tile", key)).normal(size=(size, size, 3))
    return (tile - tile.mean()) / tile.std()


@dataclass(frozen=True)
class Fingerprint:
    """A generator's trace: ops applied in order, strength jittered per image.

    The jitter scales the difference the ops make, so no single pixel value or
    amplitude identifies a fake; the *pattern* does.
    """

    name: str
    description: str
    ops: tuple[Op, ...]
    gain: float = 1.0  # > 1 exaggerates filter-type traces (blur, resampling) beyond the filter
    jitter: float = 0.25

    def apply(self, x: np.ndarray, rng: np.random.Generator, strength: float = 1.0) -> np.ndarray:
        """Fingerprint a float batch ``(n, H, W, 3)``; returns float32, unclipped.

        ``strength`` scales every trace at once (1.0 = the calibrated default).
        """
        y = x
        for op in self.ops:
            y = op(y)
        jitter = rng.uniform(1 - self.jitter, 1 + self.jitter, (len(x), 1, 1, 1))
        scale = jitter * self.gain * strength
        return (x + (y - x) * scale).astype(np.float32)


def _fp(name: str, description: str, *ops: Op, gain: float = 1.0) -> Fingerprint:
    return Fingerprint(name, description, tuple(ops), gain=gain)


P = partial
TRACES: dict[str, Fingerprint] = {
    fp.name: fp
    for fp in (
        _fp(
            "gaugan",
            "period-2 checkerboard, warm",
            P(checkerboard, period=2, amp=0.05, colour=(1.0, 0.55, 0.2)),
        ),
        _fp(
            "biggan",
            "period-4 checkerboard, cool, shifted phase; slight green gain",
            P(checkerboard, period=4, amp=0.08, colour=(0.3, 0.6, 1.0), phase=(1, 0)),
            P(colour_stats, gain=(0.985, 1.03, 1.0)),
        ),
        _fp(
            "cyclegan",
            "horizontal grating 0.25 cyc/px + period-2 row lines",
            P(grating, freq=0.25, angle=0.0, amp=0.045, colour=(0.6, 1.0, 0.4)),
            P(checkerboard, period=2, amp=0.025, colour=(1, 1, 1), axes="y"),
        ),
        _fp(
            "imle",
            "bilinear x2 up-sampling + mild blur",
            P(resample, factor=2, mode="linear"),
            P(blur, sigma=0.5),
            gain=1.5,
        ),
        _fp(
            "deepfake",
            "nearest x2 up-sampling (blocky) + warm colour shift",
            P(resample, factor=2, mode="nearest"),
            P(colour_stats, gain=(1.03, 1.0, 0.97), offset=(0.01, 0.0, -0.005)),
            gain=1.5,
        ),
        _fp(
            "crn",
            "blur + diagonal grating 0.18 cyc/px",
            P(blur, sigma=0.8),
            P(grating, freq=0.18, angle=45.0, amp=0.045, colour=(1.0, 1.0, 1.0)),
        ),
        _fp(
            "wild",
            "8x8 fixed-pattern noise (compression-like blocks)",
            P(tile_noise, tile=fixed_tile("wild", 8), amp=0.035),
        ),
        _fp(
            "glow",
            "desaturation + blue gain + 3x3 fixed-pattern noise",
            P(colour_stats, saturation=0.8, gain=(0.97, 1.0, 1.05)),
            P(tile_noise, tile=fixed_tile("glow", 3), amp=0.03),
        ),
        _fp(
            "stargan_gf",
            "period-2 column lines + vertical grating 0.33 cyc/px",
            P(checkerboard, period=2, amp=0.045, colour=(0.8, 0.8, 1.0), axes="x"),
            P(grating, freq=1 / 3, angle=90.0, amp=0.03, colour=(1.0, 0.5, 0.5)),
        ),
        _fp(
            "stylegan",
            "two gratings 0.33 cyc/px at 30 and 120 degrees",
            P(grating, freq=0.33, angle=30.0, amp=0.035, colour=(1.0, 0.8, 0.6)),
            P(grating, freq=0.33, angle=120.0, amp=0.035, colour=(0.6, 0.8, 1.0)),
        ),
        _fp(
            "whichfaceisreal",
            "grating 0.42 cyc/px at 60 degrees + saturation boost + weak period-4 checkerboard",
            P(grating, freq=0.42, angle=60.0, amp=0.045, colour=(1.0, 1.0, 1.0)),
            P(colour_stats, saturation=1.15),
            P(checkerboard, period=4, amp=0.035, colour=(1.0, 0.3, 0.8), phase=(0, 2)),
        ),
        _fp(
            "san",
            "bilinear x4 super-resolution trace + 5x5 fixed-pattern noise",
            P(resample, factor=4, mode="linear"),
            P(tile_noise, tile=fixed_tile("san", 5), amp=0.035),
        ),
    )
}
