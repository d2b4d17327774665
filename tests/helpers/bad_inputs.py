"""A shared corpus of bad inputs, and what every loader must make of each.

Each kind writes one bad thing (an image file's bytes, an array, a weight file, a config value,
a broken folder layout); ``tests/data/test_bad_inputs.py`` runs every kind against every loader
that reads it. A loader must end each in one of three ways, never a raw traceback:

* ``scan``: found while the dataset is built (before the first training step): a one-line
  ``DataError`` / ``ConfigError`` naming the file or key under ``on_bad_image=error``, a counted
  skip under ``skip``;
* ``decode``: only decoding can see it (header and end intact): the same sentence or counted skip
  when the file is read;
* ``valid``: an unusual but valid image that must load as RGB, as the originals' PIL
  ``Image.open(..).convert("RGB")`` loads it (EXIF orientation not applied).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


def _pixels(size: int, seed: int = 0, width: int | None = None) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, width or size, 3), dtype=np.uint8)


def encode(image: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png(size: int, seed: int = 0) -> bytes:
    return encode(Image.fromarray(_pixels(size, seed)), "PNG")


def jpeg(size: int, seed: int = 0) -> bytes:
    return encode(Image.fromarray(_pixels(size, seed)), "JPEG", quality=95)


def _zero_byte(size: int) -> bytes:
    return b""


def _truncated_jpeg(size: int) -> bytes:
    data = jpeg(size, 1)
    return data[: len(data) // 2]


def _truncated_png(size: int) -> bytes:
    data = png(size, 2)
    return data[: len(data) // 2]


def _text_named_png(size: int) -> bytes:
    return b"this is a text file that happens to be called bad.png\n" * 4


def _too_small(size: int) -> bytes:
    return png(max(1, size // 2), 3)


def _corrupt_body(size: int) -> bytes:
    """A PNG whose header and IEND chunk are intact but whose compressed pixels are zeroed: only decoding sees it."""
    data = bytearray(png(size, 4))
    start = len(data) // 3
    data[start : start + 64] = bytes(64)
    return bytes(data)


def _cmyk_jpeg(size: int) -> bytes:
    cmyk = np.concatenate([_pixels(size, 5), _pixels(size, 6)[..., :1]], axis=2)
    return encode(Image.fromarray(cmyk, mode="CMYK"), "JPEG", quality=95)


def _png_16bit(size: int) -> bytes:
    grey = (np.random.default_rng(7).integers(0, 2**16, (size, size))).astype(np.uint16)
    return encode(Image.fromarray(grey), "PNG")  # mode I;16


def _palette_png(size: int) -> bytes:
    return encode(Image.fromarray(_pixels(size, 8)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16), "PNG")


def _alpha_png(size: int) -> bytes:
    rgba = np.concatenate([_pixels(size, 9), np.full((size, size, 1), 128, np.uint8)], axis=2)
    return encode(Image.fromarray(rgba, mode="RGBA"), "PNG")


def _exif_rotated_jpeg(size: int) -> bytes:
    """Stored pixels plus EXIF orientation 6 ("rotate 90° clockwise to display")."""
    image = Image.fromarray(_pixels(size, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(image, "JPEG", quality=95, exif=exif.tobytes())


@dataclass(frozen=True)
class ImageKind:
    """One bad (or unusual) encoded image and what a loader must do with it."""

    name: str
    suffix: str
    make: Callable[[int], bytes]  #: side length -> file bytes
    outcome: str  #: scan | decode | valid | size (scan where the loader requires a size, else valid)
    message: str = ""  #: regex the sentence must match (scan / decode)
    reason: str = ""  #: the reason a skip is counted under


IMAGE_KINDS: tuple[ImageKind, ...] = (
    ImageKind("zero_byte", ".png", _zero_byte, "scan", r"is empty \(0 bytes\)", "unreadable"),
    ImageKind(
        "truncated_jpeg",
        ".jpg",
        _truncated_jpeg,
        "scan",
        r"is truncated: it does not end with the JPEG end-of-image marker FF D9",
        "truncated",
    ),
    ImageKind(
        "truncated_png", ".png", _truncated_png, "scan", r"is truncated: it does not end with the PNG IEND", "truncated"
    ),
    ImageKind("text_named_png", ".png", _text_named_png, "scan", r"could not be read as an image", "unreadable"),
    ImageKind("too_small", ".png", _too_small, "size"),
    ImageKind("corrupt_body", ".png", _corrupt_body, "decode", r"could not be decoded", "undecodable"),
    ImageKind("cmyk_jpeg", ".jpg", _cmyk_jpeg, "valid"),
    ImageKind("png_16bit", ".png", _png_16bit, "valid"),
    ImageKind("palette_png", ".png", _palette_png, "valid"),
    ImageKind("alpha_png", ".png", _alpha_png, "valid"),
    ImageKind("exif_rotated_jpeg", ".jpg", _exif_rotated_jpeg, "valid"),
)


def expected_rgb(data: bytes) -> np.ndarray:
    """What the originals load: ``Image.open(..).convert("RGB")`` (no ``exif_transpose``), HWC uint8."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


# -- arrays (MSCOCO release .npy files) -----------------------------------------------------------------------------
def npy_wrong_shape(path: Path, good: np.ndarray) -> str:
    np.save(path, good.reshape(good.shape[0], -1))
    return r"holds a float32 array of shape \(\d+, \d+\)"


def npy_wrong_dtype(path: Path, good: np.ndarray) -> str:
    np.save(path, (good * 100).astype(np.int64))
    return r"holds a int64 array"


def npy_nan(path: Path, good: np.ndarray) -> str:
    bad = good.copy()
    bad[-1].flat[0] = np.nan
    np.save(path, bad)
    return rf"holds NaN or infinite values \(first in row {len(good) - 1}\)"


def npy_truncated(path: Path, good: np.ndarray) -> str:
    np.save(path, good)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 16])
    return r"is not a readable \.npy array"


ARRAY_KINDS: dict[str, Callable[[Path, np.ndarray], str]] = {
    "npy_wrong_shape": npy_wrong_shape,
    "npy_wrong_dtype": npy_wrong_dtype,
    "npy_nan": npy_nan,
    "npy_truncated": npy_truncated,
}


# -- everything else: layouts, manifests, weight files, config values -----------------------------------------------
#: the kinds that break a folder layout, a manifest, a weight file or a config value (tests/data/test_bad_inputs.py
#: says, per loader, how each is made and which sentence it must give)
OTHER_KINDS: tuple[str, ...] = (
    "wrong_split_names",
    "empty_class_folder",
    "missing_listed_file",
    "checkpoint_of_another_model",
    "config_value_of_wrong_type",
)

ALL_KINDS: tuple[str, ...] = tuple(k.name for k in IMAGE_KINDS) + tuple(ARRAY_KINDS) + OTHER_KINDS

#: a value no integer, float or boolean config key accepts
WRONG_TYPE_VALUE = "abc"
