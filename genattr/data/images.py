"""Image-list datasets and the folder scan that guards them.

Every image dataset in genattr is a flat list of ``Sample`` records read lazily from
disk, so the same code serves a real dataset and its synthetic twin (DESIGN
principle 1). Bad files are caught at scan time, from image headers only, because
decoding a full real dataset just to validate it would take longer than a short run;
anything a header cannot reveal (a truncated body) is caught when the file is decoded
and reported with its path (principle 6).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as F

from genattr.utils.errors import ConfigError, DataError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
BAD_IMAGE_POLICIES = ("error", "skip")
_SKIP_HINT = "or set data.on_bad_image=skip to leave such files out (they are counted)"
# PIL signals undecodable data with several exception types depending on the codec.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Sample:
    """One image on disk with its class label and the index of the task it belongs to."""

    path: str
    label: int
    task: int


@dataclass
class BadImageStats:
    """Counts of images left out under ``on_bad_image=skip``, per reason.

    A few example paths per reason are kept so that the logged summary points at
    real files without flooding the log on a badly broken dataset.
    """

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5

    def record(self, reason: str, path: Path) -> None:
        """Count one skipped file under ``reason``."""
        self.counts[reason] = self.counts.get(reason, 0) + 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < self.max_examples:
            shown.append(str(path))

    @property
    def total(self) -> int:
        """Number of skipped files over all reasons."""
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict form for ``protocol.info`` and MLflow."""
        return {
            "total": self.total,
            "counts": dict(self.counts),
            "examples": {k: list(v) for k, v in self.examples.items()},
        }


def check_bad_image_policy(on_bad_image: str) -> None:
    """Reject a misspelt policy before any folder is scanned."""
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ConfigError(
            f"data.on_bad_image={on_bad_image!r} is not a policy; use one of {'|'.join(BAD_IMAGE_POLICIES)}"
        )


def _header_problem(path: Path, min_size: int) -> tuple[str, str] | None:
    """Return ``(reason, sentence)`` if the header shows the file is unusable."""
    try:
        with Image.open(path) as im:
            width, height = im.size
    except _DECODE_ERRORS as err:
        return "unreadable", (
            f"{path} could not be read as an image ({err}); expected a readable "
            f"{'/'.join(sorted(s[1:] for s in IMAGE_SUFFIXES))} file. "
            f"Replace or delete it, {_SKIP_HINT}"
        )
    if width < min_size or height < min_size:
        return "too_small", (
            f"{path} is {width}x{height}, smaller than the {min_size} crop; images are "
            f"cropped at native resolution without resizing, so every side must be "
            f">= {min_size}. Remove or replace it, {_SKIP_HINT}"
        )
    return None


def scan_image_folder(folder: Path, *, min_size: int, on_bad_image: str, stats: BadImageStats) -> list[Path]:
    """List the usable images directly inside ``folder``, sorted by name.

    Only headers are read (``Image.open(..).size``), which is what makes scanning a
    whole real dataset cheap enough to do at every start.
    """
    check_bad_image_policy(on_bad_image)
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} does not exist or is not a folder; expected a folder of images")
    candidates = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not candidates:
        raise DataError(
            f"{folder} holds no image files; expected images with one of the suffixes "
            f"{', '.join(sorted(IMAGE_SUFFIXES))}"
        )
    kept: list[Path] = []
    for path in candidates:
        problem = _header_problem(path, min_size)
        if problem is None:
            kept.append(path)
        elif on_bad_image == "skip":
            stats.record(problem[0], path)
        else:
            raise DataError(problem[1])
    if not kept:
        raise DataError(
            f"all {len(candidates)} images in {folder} were skipped as unreadable or "
            f"smaller than {min_size}px; nothing is left to train or test on"
        )
    return kept


def load_rgb(path: str) -> Image.Image:
    """Decode ``path`` fully as RGB, turning any decoder failure into a ``DataError``.

    ``load()`` forces decoding here so that a truncated body fails with the file's
    name instead of somewhere inside a transform.
    """
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except _DECODE_ERRORS as err:
        raise DataError(
            f"{path} could not be decoded ({err}); expected a complete, readable image. "
            f"The file is probably truncated or corrupt: replace or delete it"
        ) from err


class ImageListDataset(Dataset):
    """A map-style dataset over ``Sample`` records, decoded lazily with PIL.

    It holds only paths and ints, so it pickles cheaply into DataLoader workers.
    Without a transform an item is a float CHW tensor in [0, 1].
    """

    def __init__(self, samples: Sequence[Sample], transform: Callable[[Any], Any] | None = None) -> None:
        self.samples: list[Sample] = list(samples)
        self.transform = transform
        self.labels: np.ndarray = np.fromiter((s.label for s in self.samples), dtype=np.int64, count=len(self.samples))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        image = load_rgb(sample.path)
        if self.transform is None:
            return F.to_dtype(F.pil_to_tensor(image), torch.float32, scale=True), sample.label
        return self.transform(image), sample.label

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageListDataset:
        """Same transform over the chosen samples (used for exemplar memories)."""
        return ImageListDataset([self.samples[int(i)] for i in indices], self.transform)

    def with_transform(self, transform: Callable[[Any], Any] | None) -> ImageListDataset:
        """Same samples, other transform (e.g. herding on test-style crops)."""
        return ImageListDataset(self.samples, transform)

    def __repr__(self) -> str:
        return f"ImageListDataset(n={len(self)}, transform={self.transform!r})"
