"""Procedural image content for synthetic twins, vectorised over a batch with numpy.

Content plays the role of the *scene* a real camera (or a generator) depicts. Each
domain (a CDDB task) gets its own ``Style`` - palette, shape vocabulary, texture
scale - so a model can tell domains apart somewhat, while real and fake images of one
domain share exactly the same content distribution and differ only by the fingerprint
applied afterwards (see ``fingerprints.py``).

All arrays are float32 ``(n, H, W, 3)`` in [0, 1]; sizes are fractions of the image
side so that a style looks the same at 40 px and at 256 px.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

SHAPE_KINDS = ("disc", "rect", "ring", "blob")


def name_seed(*parts: str | int) -> int:
    """A seed derived from names, stable across processes (unlike ``hash``)."""
    return zlib.crc32("/".join(str(p) for p in parts).encode())


def hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB for arrays of equal shape; returns ``(..., 3)``."""
    h = np.mod(h, 1.0) * 6.0
    i = np.floor(h).astype(np.int64) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = np.stack(
        [
            np.stack([v, t, p], -1),
            np.stack([q, v, p], -1),
            np.stack([p, v, t], -1),
            np.stack([p, q, v], -1),
            np.stack([t, p, v], -1),
            np.stack([v, p, q], -1),
        ],
        0,
    )
    return np.take_along_axis(table, i[None, ..., None].repeat(3, -1), 0)[0]


def resize_linear(a: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of ``(n, h, w, c)``, half-pixel centres (align_corners=False)."""
    for axis, out in ((1, height), (2, width)):
        size = a.shape[axis]
        src = np.clip((np.arange(out) + 0.5) * size / out - 0.5, 0, size - 1)
        i0 = np.floor(src).astype(np.int64)
        i1 = np.minimum(i0 + 1, size - 1)
        shape = [1, 1, 1, 1]
        shape[axis] = out
        w = (src - i0).reshape(shape).astype(a.dtype)
        a = a.take(i0, axis) * (1 - w) + a.take(i1, axis) * w
    return a


def gaussian_blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of ``(n, H, W, c)`` with reflected borders."""
    radius = max(1, int(np.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(a.dtype)
    for axis in (1, 2):
        pad = [(0, 0)] * 4
        pad[axis] = (radius, radius)
        padded = np.pad(a, pad, mode="reflect")
        size = a.shape[axis]
        a = sum(w * padded.take(np.arange(k, k + size), axis) for k, w in enumerate(taps))
    return a


@dataclass(frozen=True)
class Style:
    """The look of one domain; every field is a distribution, not a fixed value."""

    palette: np.ndarray  # (k, 3) RGB in [0, 1]
    shape_kinds: tuple[str, ...]
    n_shapes: tuple[int, int]  # inclusive range per image
    radius: tuple[float, float]  # fraction of the side
    softness: float  # edge width in pixels
    stripe_prob: float
    stripe_period: tuple[float, float]  # fraction of the side
    noise_cells: int  # coarse value-noise grid (texture scale)
    texture_amp: float
    grain: tuple[float, float]  # per-pixel noise sigma range


def random_style(rng: np.random.Generator) -> Style:
    """Draw a domain: one hue family, a shape vocabulary and a texture scale."""
    hue = rng.uniform()
    k = 5
    palette = hsv_to_rgb(
        hue + rng.uniform(-0.12, 0.12, k) + rng.choice([0.0, 0.5], k, p=[0.8, 0.2]),
        rng.uniform(0.2, 0.9, k),
        rng.uniform(0.25, 0.95, k),
    ).astype(np.float32)
    n_kinds = int(rng.integers(1, 3))
    kinds = tuple(sorted(rng.choice(SHAPE_KINDS, n_kinds, replace=False).tolist()))
    lo = float(rng.uniform(0.06, 0.2))
    n_lo = int(rng.integers(0, 4))
    period = float(rng.uniform(0.1, 0.35))
    grain = float(rng.uniform(0.006, 0.015))
    return Style(
        palette=palette,
        shape_kinds=kinds,
        n_shapes=(n_lo, n_lo + int(rng.integers(1, 5))),
        radius=(lo, lo + float(rng.uniform(0.08, 0.25))),
        softness=float(rng.choice([0.6, 1.0, 2.5])),
        stripe_prob=float(rng.uniform(0.0, 0.7)),
        stripe_period=(period, period * float(rng.uniform(1.2, 2.0))),
        noise_cells=int(rng.integers(2, 9)),
        texture_amp=float(rng.uniform(0.03, 0.15)),
        grain=(grain, grain * 1.6),
    )


def domain_style(*names: str) -> Style:
    """The fixed style of a named domain (e.g. ``("cyclegan", "horse")``)."""
    return random_style(np.random.default_rng(name_seed("style", *names)))


def _shape_alpha(
    kind: str,
    dx: np.ndarray,
    dy: np.ndarray,
    r: np.ndarray,
    aspect: np.ndarray,
    edge: np.ndarray,
) -> np.ndarray:
    """Soft coverage in [0, 1] of one shape kind; distances are in pixels."""
    if kind == "rect":
        d = np.maximum(np.abs(dx) / (r * aspect), np.abs(dy) * aspect / r)
        return np.clip((1 - d) * r / edge + 0.5, 0, 1)
    dist = np.sqrt(dx**2 + (dy * aspect) ** 2)
    if kind == "disc":
        return np.clip((r - dist) / edge + 0.5, 0, 1)
    if kind == "ring":
        return np.clip((0.25 * r - np.abs(dist - 0.7 * r)) / edge + 0.5, 0, 1)
    return np.exp(-2.0 * (dist / r) ** 2)  # blob


def _per_image(values: np.ndarray) -> np.ndarray:
    """Per-image parameters as float32 ``(n, 1, 1)``, broadcasting over ``(n, H, W)``."""
    return np.asarray(values, np.float32)[:, None, None]


def _blend(img: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Composite per-image ``colour`` ``(n, 3)`` over ``img`` by ``alpha`` ``(n, H, W)``."""
    img += alpha[..., None] * (colour.astype(np.float32)[:, None, None, :] - img)
    return img


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Images in [0, 1] (what :func:`render` and the fingerprints return) as rounded, clipped uint8 pixels."""
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def render(rng: np.random.Generator, n: int, size: int, style: Style) -> np.ndarray:
    """Render ``n`` images of side ``size``: gradient, texture, stripes, shapes, grain."""
    pal = style.palette
    pix = np.arange(size, dtype=np.float32) + 0.5
    yy, xx = np.meshgrid(pix, pix, indexing="ij")

    # Background: a linear gradient between two palette colours.
    cols = pal[rng.integers(len(pal), size=(n, 2))]
    theta = rng.uniform(0, 2 * np.pi, n)
    proj = _per_image(np.cos(theta)) * (xx - size / 2) + _per_image(np.sin(theta)) * (yy - size / 2)
    img = np.repeat(cols[:, None, None, 0], size, 1).repeat(size, 2)
    img = _blend(img, cols[:, 1], np.clip(proj / size + 0.5, 0, 1))

    # Coarse texture: value noise at the domain's scale.
    cells = style.noise_cells
    grid = rng.standard_normal((n, cells + 1, cells + 1, 3), np.float32)
    img += np.float32(style.texture_amp) * resize_linear(grid, size, size)

    # Stripes on a fraction of the images.
    period = np.maximum(rng.uniform(*style.stripe_period, n) * size, 3.0)
    phi = rng.uniform(0, 2 * np.pi, n)
    wave = _per_image(np.cos(phi) / period) * xx + _per_image(np.sin(phi) / period) * yy
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * wave + _per_image(rng.uniform(0, 2 * np.pi, n)))
    on = (rng.uniform(size=n) < style.stripe_prob) * rng.uniform(0.3, 0.7, n)
    img = _blend(img, pal[rng.integers(len(pal), size=n)], stripes * _per_image(on))

    # Shapes in the domain's vocabulary.
    n_shapes = rng.integers(style.n_shapes[0], style.n_shapes[1] + 1, n)
    kinds = np.array(style.shape_kinds)
    edge = np.float32(style.softness)
    for j in range(style.n_shapes[1]):
        cx, cy = rng.uniform(0, size, (2, n))
        r = _per_image(rng.uniform(*style.radius, n) * size)
        aspect = _per_image(rng.uniform(0.6, 1.6, n))
        kind = kinds[rng.integers(len(kinds), size=n)]
        dx, dy = xx - _per_image(cx), yy - _per_image(cy)
        alpha = np.zeros((n, size, size), np.float32)
        for k in style.shape_kinds:
            alpha = np.where(
                (kind == k)[:, None, None],
                _shape_alpha(k, dx, dy, r, aspect, edge),
                alpha,
            )
        alpha *= _per_image((j < n_shapes) * rng.uniform(0.6, 1.0, n))
        img = _blend(
            img,
            pal[rng.integers(len(pal), size=n)] + rng.normal(0, 0.04, (n, 3)),
            alpha,
        )

    # Sensor-like grain, so that every image carries some high-frequency energy.
    sigma = _per_image(rng.uniform(*style.grain, n))[..., None]
    img += sigma * rng.standard_normal(img.shape, np.float32)
    return np.clip(img, 0.0, 1.0, out=img)
