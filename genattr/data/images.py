"""Image-list datasets and the folder scan that guards them.

Every image dataset in genattr is a flat list of ``Sample`` records read lazily from
disk, so the same code serves a real dataset and its synthetic twin (DESIGN
principle 1). Bad files are caught at scan time, before the first training step, from
each file's first and last bytes: the header gives format and size, the end shows a
truncated body (a JPEG must end with the end-of-image marker ``FF D9``, a PNG with its
``IEND`` chunk, a WebP must be as long as its RIFF header says). Only a file whose end
looks wrong is decoded, to confirm, so the scan stays cheap on a real dataset (README,
"Bad input": about 1 s per 10k files from the page cache). What still fails at decode
time follows the same ``data.on_bad_image`` policy: an error naming the file, or a counted
skip (principle 6).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import uuid
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as F

from genattr.utils.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
BAD_IMAGE_POLICIES = ("error", "skip")
_SKIP_HINT = "or set data.on_bad_image=skip to leave such files out (they are counted)"
# PIL signals undecodable data with several exception types depending on the codec.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)

_HEAD_BYTES = 16
#: bytes read from the end of a file: room for the 12-byte IEND chunk or FF D9 plus a little padding
_TAIL_BYTES = 32
_JPEG_SOI = b"\xff\xd8\xff"
_JPEG_EOI = b"\xff\xd9"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"
#: reason under which decode-time skips are counted (scan-time reasons: unreadable, truncated, too_small)
DECODE_REASON = "undecodable"


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
    real files without flooding the log on a badly broken dataset. Scan-time skips are
    counted in memory (the scan runs in the main process); decode-time skips happen in
    DataLoader workers too, whose memory the main process never sees, so they are
    appended to ``ledger`` (a small file, created at the first such skip) and read back by
    :meth:`as_dict` / :attr:`total`, one count per distinct file.
    """

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5
    ledger: str | None = None
    _seen: set[str] = field(default_factory=set, repr=False, compare=False)

    @classmethod
    def for_policy(cls, on_bad_image: str) -> BadImageStats:
        """Stats for one dataset build; under ``skip`` with a ledger that every worker process can append to."""
        check_bad_image_policy(on_bad_image)
        if on_bad_image != "skip":
            return cls()
        name = f"genattr-bad-images-{os.getpid()}-{uuid.uuid4().hex[:12]}.tsv"
        stats = cls(ledger=os.path.join(tempfile.gettempdir(), name))
        # the ledger lives as long as these stats (the protocol's); copies in worker processes never remove it
        weakref.finalize(stats, _remove_file, stats.ledger)
        return stats

    def record(self, reason: str, path: Path | str) -> None:
        """Count one skipped file under ``reason``."""
        self.counts[reason] = self.counts.get(reason, 0) + 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < self.max_examples:
            shown.append(str(path))

    def record_decode(self, path: Path | str, err: BaseException) -> None:
        """Count a file that failed to decode during the run (skipped under ``on_bad_image=skip``)."""
        path = str(path)
        if path in self._seen:  # the same file fails again every epoch: one warning, one count
            return
        self._seen.add(path)
        log.warning("skipped %s at decode time (data.on_bad_image=skip): %s", path, err)
        if self.ledger is None:
            self.record(DECODE_REASON, path)
            return
        fd = os.open(self.ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:  # one short O_APPEND write per line: lines of several processes never interleave
            os.write(fd, f"{DECODE_REASON}\t{path}\n".encode())
        finally:
            os.close(fd)

    def _decode_skips(self) -> list[str]:
        if self.ledger is None or not os.path.isfile(self.ledger):
            return []
        with open(self.ledger, encoding="utf-8") as fh:
            paths = [line.rstrip("\n").split("\t", 1)[1] for line in fh if "\t" in line]
        return list(dict.fromkeys(paths))

    @property
    def total(self) -> int:
        """Number of skipped files over all reasons, at scan time and at decode time."""
        return sum(self.counts.values()) + len(self._decode_skips())

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict form for ``protocol.info``, results.json and MLflow."""
        counts, examples = dict(self.counts), {k: list(v) for k, v in self.examples.items()}
        decoded = self._decode_skips()
        if decoded:
            counts[DECODE_REASON] = counts.get(DECODE_REASON, 0) + len(decoded)
            examples[DECODE_REASON] = (examples.get(DECODE_REASON, []) + decoded)[: self.max_examples]
        return {"total": sum(counts.values()), "counts": counts, "examples": examples}


def _remove_file(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def check_bad_image_policy(on_bad_image: str) -> None:
    """Reject a misspelt policy before any folder is scanned."""
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ConfigError(
            f"data.on_bad_image={on_bad_image!r} is not a policy; use one of {'|'.join(BAD_IMAGE_POLICIES)}"
        )


def truncation(head: bytes, tail: bytes, size: int) -> str | None:
    """Why an encoded image looks cut short, from its first and last bytes only (None: it looks complete).

    A JPEG ends with the end-of-image marker ``FF D9``, a PNG with its ``IEND`` chunk, and a
    WebP's RIFF header states the file's length. Extra bytes after the end (padding, appended
    data) also fail this test, so callers confirm a suspect by decoding it.
    """
    if head.startswith(_JPEG_SOI) and _JPEG_EOI not in tail:
        return "it does not end with the JPEG end-of-image marker FF D9"
    if head.startswith(_PNG_SIGNATURE) and _PNG_IEND not in tail:
        return "it does not end with the PNG IEND chunk"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP" and int.from_bytes(head[4:8], "little") + 8 > size:
        return f"its RIFF header promises {int.from_bytes(head[4:8], 'little') + 8} bytes but it has {size}"
    return None


def _ends(fh: IO[bytes], size: int) -> tuple[bytes, bytes]:
    head = fh.read(_HEAD_BYTES)
    if size > _TAIL_BYTES:
        fh.seek(size - _TAIL_BYTES)
    else:
        fh.seek(0)
    tail = fh.read(_TAIL_BYTES)
    fh.seek(0)
    return head, tail


def image_problem(
    source: str | Path | IO[bytes], *, size: int, name: str, min_size: int = 1, exact_size: int | None = None
) -> tuple[str, str] | None:
    """``(reason, sentence)`` if the encoded image in ``source`` is unusable, else None.

    ``size`` is the byte length, ``name`` what the sentence calls the file. Reads the
    header and the last bytes; decodes only a file whose end looks truncated. Reasons:
    ``unreadable`` (empty, not an image), ``truncated``, ``too_small`` / ``wrong_size``.
    """
    kinds = "/".join(sorted(s[1:] for s in IMAGE_SUFFIXES))
    if size == 0:
        return "unreadable", f"{name} is empty (0 bytes); expected a readable {kinds} file"
    cut: str | None = None
    fh = open(source, "rb") if isinstance(source, str | Path) else source  # noqa: SIM115 - closed below
    try:
        head, tail = _ends(fh, size)
        cut = truncation(head, tail, size)
        with Image.open(fh) as im:
            width, height = im.size
            if cut is not None:
                im.load()  # the end looked wrong: only a full decode can tell padding from truncation
    except _DECODE_ERRORS as err:
        why = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        if cut is not None:
            return "truncated", f"{name} is truncated: {cut} and decoding it fails ({why})"
        return "unreadable", f"{name} could not be read as an image ({why}); expected a readable {kinds} file"
    finally:
        if fh is not source:
            fh.close()
    if exact_size is not None and (width, height) != (exact_size, exact_size):
        return "wrong_size", f"{name} is {width}x{height} but the images must be {exact_size}x{exact_size}"
    if width < min_size or height < min_size:
        return "too_small", (
            f"{name} is {width}x{height}, smaller than the {min_size} crop; images are "
            f"cropped at native resolution without resizing, so every side must be >= {min_size}"
        )
    return None


def _file_problem(path: Path, min_size: int) -> tuple[str, str] | None:
    """:func:`image_problem` of a file on disk, with the hint that ``skip`` exists."""
    try:
        size = path.stat().st_size
        problem = image_problem(path, size=size, name=str(path), min_size=min_size)
    except OSError as err:  # unreadable for the OS itself (permissions, I/O error)
        problem = ("unreadable", f"{path} could not be opened ({err})")
    if problem is None:
        return None
    return problem[0], f"{problem[1]}. Replace or delete it, {_SKIP_HINT}"


def scan_image_folder(folder: Path, *, min_size: int, on_bad_image: str, stats: BadImageStats) -> list[Path]:
    """List the usable images directly inside ``folder``, sorted by name.

    Reads each file's header and last bytes (:func:`image_problem`), which is what makes
    scanning a whole real dataset cheap enough to do at every start.
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
        problem = _file_problem(path, min_size)
        if problem is None:
            kept.append(path)
        elif on_bad_image == "skip":
            stats.record(problem[0], path)
        else:
            raise DataError(problem[1])
    if not kept:
        raise DataError(
            f"all {len(candidates)} images in {folder} were skipped as unreadable, truncated or "
            f"smaller than {min_size}px; nothing is left to train or test on"
        )
    return kept


def load_rgb(path: str) -> Image.Image:
    """Decode ``path`` fully as RGB, turning any decoder failure into a ``DataError``.

    ``load()`` forces decoding here so that a corrupt body fails with the file's name
    instead of somewhere inside a transform. CMYK, 16-bit, palette and alpha images are
    converted as PIL converts them; EXIF orientation is not applied (the originals call
    ``Image.open(..).convert('RGB')`` without ``exif_transpose``).
    """
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except _DECODE_ERRORS as err:
        raise DataError(
            f"{path} could not be decoded ({err}); expected a complete, readable image. "
            f"The file is probably truncated or corrupt: replace or delete it, {_SKIP_HINT}"
        ) from err


def next_same_label(labels: np.ndarray, index: int) -> list[int]:
    """Indices after ``index`` (wrapping) with its label: where a decode-time skip takes its stand-in from."""
    n = len(labels)
    order = (np.arange(1, n) + index) % n
    return [int(j) for j in order[labels[order] == labels[index]]]


class ImageListDataset(Dataset):
    """A map-style dataset over ``Sample`` records, decoded lazily with PIL.

    It holds only paths and ints, so it pickles cheaply into DataLoader workers.
    Without a transform an item is a float CHW tensor in [0, 1]. Under
    ``on_bad_image=skip`` a file that fails only at decode time (the scan passed it) is
    counted in ``stats`` and replaced by the next decodable image of the same label,
    because a map-style dataset's length and label array are fixed once loaders exist.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        transform: Callable[[Any], Any] | None = None,
        *,
        on_bad_image: str = "error",
        stats: BadImageStats | None = None,
    ) -> None:
        check_bad_image_policy(on_bad_image)
        self.samples: list[Sample] = list(samples)
        self.transform = transform
        self.on_bad_image = on_bad_image
        self.stats = stats if stats is not None else BadImageStats()
        self.labels: np.ndarray = np.fromiter((s.label for s in self.samples), dtype=np.int64, count=len(self.samples))

    def __len__(self) -> int:
        return len(self.samples)

    def _decode(self, index: int) -> Image.Image:
        path = self.samples[index].path
        try:
            return load_rgb(path)
        except DataError as err:
            if self.on_bad_image != "skip":
                raise
            self.stats.record_decode(path, err.__cause__ or err)
        for j in next_same_label(self.labels, index):
            try:
                return load_rgb(self.samples[j].path)
            except DataError as err:
                self.stats.record_decode(self.samples[j].path, err.__cause__ or err)
        raise DataError(
            f"{path} could not be decoded and no other image of label {self.samples[index].label} in its set "
            "decodes either (data.on_bad_image=skip replaces a bad file by one of them); check the files of that class"
        )

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        image = self._decode(index)
        if self.transform is None:
            return F.to_dtype(F.pil_to_tensor(image), torch.float32, scale=True), sample.label
        return self.transform(image), sample.label

    def with_samples(self, samples: Sequence[Sample]) -> ImageListDataset:
        """Other samples, same transform and bad-image policy (exemplar memories, subsets)."""
        return ImageListDataset(samples, self.transform, on_bad_image=self.on_bad_image, stats=self.stats)

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageListDataset:
        """Same transform over the chosen samples (used for exemplar memories)."""
        return self.with_samples([self.samples[int(i)] for i in indices])

    def with_transform(self, transform: Callable[[Any], Any] | None) -> ImageListDataset:
        """Same samples, other transform (e.g. herding on test-style crops)."""
        return ImageListDataset(self.samples, transform, on_bad_image=self.on_bad_image, stats=self.stats)

    def __repr__(self) -> str:
        return f"ImageListDataset(n={len(self)}, transform={self.transform!r})"
