"""AI-GenBench as a sliding-windows protocol, read from the real on-disk format.

The benchmark ships as a Hugging Face ``DatasetDict`` written with ``save_to_disk``
(Arrow shards, splits ``train`` and ``validation``). With ``root: null`` the run writes the
synthetic twin in exactly that format (:mod:`genattr.twins.aigenbench`) and this same loader reads it.

Row identity: ``ID`` is the row index within the split *before* filtering to the
benchmark generators (what the original code and its prediction dumps use);
``file_id`` is the stable string key we also record.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from genattr.data.aigenbench.splits import (
    VAL_BALANCE_SEED,
    VAL_PAIRING_SEED,
    VAL_SHUFFLE_SEED,
    allot_training_rows,
    pair_reals,
    select_validation,
    shuffled_order,
    subset_mask,
)
from genattr.data.aigenbench.timeline import REAL, Timeline
from genattr.data.base import require_root
from genattr.data.images import BadImageStats, check_bad_image_policy, image_problem, next_same_label
from genattr.utils.errors import ConfigError, DataError

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("image", "label", "generator", "file_id")
SPLITS = ("train", "validation")
BENCHMARK_TYPES = ("cumulative", "continual_learning")
WINDOW_ORDERS = ("newest_first", "oldest_first")


class ArrowImages:
    """Decodes the ``image`` column of one split on demand; pickles into DataLoader workers.

    Under ``on_bad_image=skip`` a row that fails only at decode time (the scan passed it) is counted in
    ``stats`` and replaced by the next decodable row of the same generator (``groups``: one key per row
    of the split, -1 for rows that must never stand in), so windows and evaluation subsets keep their
    sizes and labels.
    """

    def __init__(
        self,
        root: Path,
        split: str,
        *,
        on_bad_image: str = "error",
        stats: BadImageStats | None = None,
        groups: np.ndarray | None = None,
    ) -> None:
        self.root, self.split = root, split
        self.on_bad_image, self.stats, self.groups = on_bad_image, stats, groups
        self._table: Any = None

    def _column(self) -> Any:
        if self._table is None:
            from datasets import Image as HFImage
            from datasets import load_from_disk

            ds = load_from_disk(str(self.root / self.split)).select_columns(["image", "file_id"])
            self._table = ds.cast_column("image", HFImage(decode=False))  # we decode, to name bad files
        return self._table

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_table": None}

    def _decode(self, row: int) -> Image.Image:
        item = self._column()[int(row)]
        raw = item["image"] or {}
        try:
            if raw.get("bytes") is not None:
                source: Any = io.BytesIO(raw["bytes"])
            else:
                source = _image_path(self.root / self.split, raw.get("path"))
            with Image.open(source) as image:
                image.load()
                return image.convert("RGB")
        except Exception as err:  # PIL raises several unrelated types for broken files
            raise DataError(
                f"{self.root}/{self.split} row {row} (file_id {item.get('file_id')!r}) could not be decoded: {err}; "
                "replace the image, or set data.on_bad_image=skip (skips are counted)"
            ) from err

    def __call__(self, row: int) -> Image.Image:
        try:
            return self._decode(row)
        except DataError as err:
            if self.on_bad_image != "skip" or self.stats is None or self.groups is None:
                raise
            self.stats.record_decode(f"{self.root}/{self.split} row {row}", err.__cause__ or err)
        for other in next_same_label(self.groups, int(row)):
            try:
                return self._decode(other)
            except DataError as err:
                self.stats.record_decode(f"{self.root}/{self.split} row {other}", err.__cause__ or err)
        raise DataError(
            f"{self.root}/{self.split} row {row} could not be decoded and no other row of its generator decodes "
            "either (data.on_bad_image=skip replaces a bad row by one of them)"
        )


class _CellFile(io.RawIOBase):
    """A read-only, seekable file over an Arrow cell's bytes, without copying them (PIL needs a full file API)."""

    def __init__(self, view: memoryview) -> None:
        self._view, self._pos = view, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), len(self._view) - self._pos))
        buffer[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


def _image_path(folder: Path, path: str | None) -> Path:
    """Where an ``image`` cell stored as a path points: absolute, or relative to the split folder."""
    if not path:
        raise DataError(f"{folder}: an image cell holds neither bytes nor a path")
    p = Path(path).expanduser()
    return p if p.is_absolute() else folder / p


def _scan_images(
    folder: Path, table: Any, rows: np.ndarray, file_ids: list[str], on_bad_image: str, stats: BadImageStats
) -> np.ndarray:
    """Which of ``rows`` hold a usable image, from each image's header and last bytes (no decoding).

    The bytes stay in the memory-mapped Arrow shards (zero-copy buffers), so only the pages with a
    header and an end are read; a cell stored as a path is checked as a file. A bad image is an error
    naming its row and ``file_id``, or, under ``skip``, counted and left out.
    """
    chunks = table.column("image").chunks  # never combined: that would copy every image into memory
    starts = np.cumsum([0] + [len(c) for c in chunks])
    fields = [(c.field("bytes"), c.field("path")) for c in chunks]
    ok = np.ones(len(rows), dtype=bool)
    for k, row in enumerate(rows.tolist()):
        name = f"{folder} row {row} (file_id {file_ids[row]!r})"
        c = int(np.searchsorted(starts, row, side="right")) - 1
        (data, paths), at = fields[c], row - int(starts[c])
        cell = data[at]
        if cell.is_valid:
            view = memoryview(cell.as_buffer()).cast("B")
            problem = image_problem(io.BufferedReader(_CellFile(view)), size=len(view), name=name)
        else:
            path = paths[at].as_py()
            try:
                file = _image_path(folder, path)
                if not file.is_file():
                    problem = ("missing", f"{name} names the image file {file}, which does not exist")
                else:
                    problem = image_problem(file, size=file.stat().st_size, name=f"{name} ({file})")
            except DataError:
                problem = ("missing", f"{name} holds neither image bytes nor a path")
        if problem is None:
            continue
        if on_bad_image != "skip":
            raise DataError(f"{problem[1]}. Replace the image, or set data.on_bad_image=skip (skips are counted)")
        stats.record(problem[0], name)
        ok[k] = False
    return ok


@dataclass
class DetectionSplit:
    """The benchmark rows of one split: labels, generator ids, ids, and an image decoder."""

    name: str
    images: ArrowImages
    rows: np.ndarray  #: row index in the split = the benchmark's ``ID``
    labels: np.ndarray  #: 0 real, 1 fake
    generator_ids: np.ndarray  #: alphabetical ids, 0 = real
    file_ids: list[str]

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, positions: np.ndarray) -> DetectionSplit:
        positions = np.asarray(positions, dtype=np.int64)
        return DetectionSplit(
            self.name,
            self.images,
            self.rows[positions],
            self.labels[positions],
            self.generator_ids[positions],
            [self.file_ids[i] for i in positions],
        )


@dataclass
class DetectionProtocol:
    """Chronological windows of generators, their training rows and the scored validation set."""

    kind: ClassVar[str] = "detection"
    name: str
    source: str
    root: Path
    timeline: Timeline
    train: DetectionSplit
    window_rows: list[np.ndarray]  #: per window: positions in ``train`` of that window only (reals, then fakes)
    validation: DetectionSplit  #: balanced, in evaluation order (reals-first selection, then shuffled)
    pairing: np.ndarray  #: per validation position: paired generator id of a real, -1 for a fake
    benchmark_type: str = "cumulative"
    info: dict[str, Any] = field(default_factory=dict)
    #: images left out under ``data.on_bad_image=skip``; read at the end, it holds the decode-time skips too
    bad_images: BadImageStats | None = None

    @property
    def n_windows(self) -> int:
        return len(self.timeline.windows)

    def training_positions(self, k: int, order: str = "newest_first") -> np.ndarray:
        """Rows trained in window k: windows 0..k (cumulative) or k alone (continual_learning).

        ``newest_first`` is the original's cumulative list ``[window k, k-1, ..., 0]`` (each
        window's reals, then its fakes). Since a position seeds an image's fixed variants,
        the images of earlier windows move, and get new variants, every time a window is
        added. ``oldest_first`` (``[0, ..., k]``) keeps each image at the position, and
        with the variants, of the window that introduced it.
        """
        if order not in WINDOW_ORDERS:
            raise ConfigError(f"training window order {order!r}; expected one of {list(WINDOW_ORDERS)}")
        if self.benchmark_type != "cumulative":
            return self.window_rows[k]
        parts = self.window_rows[: k + 1]
        return np.concatenate(parts[::-1] if order == "newest_first" else parts)

    def window_ids(self, windows: range | list[int]) -> list[int]:
        return [self.timeline.generator_id(g) for g in self.timeline.generators_in(windows)]

    def subsets(self, k: int) -> dict[str, np.ndarray]:
        """Validation masks scored after window k.

        ``next`` = window k+1 (for the last window the original code falls back to window k
        itself, which is seen data; it is reported but excluded from the score);
        ``growing`` = windows 0..k; ``whole`` = windows 0..k+1.
        """
        last = self.n_windows - 1
        nxt = min(k + 1, last)
        val = self.validation
        return {
            "next": subset_mask(val.generator_ids, self.pairing, self.window_ids([nxt])),
            "growing": subset_mask(val.generator_ids, self.pairing, self.window_ids(range(k + 1))),
            "whole": subset_mask(val.generator_ids, self.pairing, self.window_ids(range(min(k + 2, last + 1)))),
        }


def _read_split(root: Path, split: str, timeline: Timeline, on_bad_image: str, stats: BadImageStats) -> DetectionSplit:
    from datasets import load_from_disk

    folder = root / split
    if not folder.is_dir():
        raise DataError(
            f"{folder} does not exist; data.root must be a DatasetDict saved with save_to_disk, "
            f"holding the splits {list(SPLITS)}"
        )
    try:
        ds = load_from_disk(str(folder))
    except Exception as err:
        raise DataError(f"{folder} is not a datasets.Dataset saved with save_to_disk: {err}") from err
    missing = [c for c in REQUIRED_COLUMNS if c not in ds.column_names]
    if missing:
        raise DataError(f"{folder} lacks the columns {missing} (it has {ds.column_names})")
    table = ds.data
    generators = table.column("generator").to_pylist()
    labels = np.asarray(table.column("label").to_pylist(), dtype=np.int64)
    file_ids = table.column("file_id").to_pylist()
    known = set(timeline.generators) | {REAL}
    keep = np.fromiter((g in known for g in generators), dtype=bool, count=len(generators))
    dropped = len(generators) - int(keep.sum())
    candidates = np.flatnonzero(keep)
    keep[candidates] = _scan_images(folder, table, candidates, file_ids, on_bad_image, stats)
    present = {g for g, k in zip(generators, keep, strict=True) if k}
    absent = [g for g in timeline.generators if g not in present]
    if absent:
        raise DataError(f"{folder}: no usable images of the benchmark generators {absent}")
    if dropped:
        log.info("%s: %d rows of generators outside the benchmark table are ignored", folder, dropped)
    rows = np.flatnonzero(keep)
    ids = np.asarray([timeline.generator_id(generators[i]) for i in rows], dtype=np.int64)
    lab = labels[rows]
    bad = np.flatnonzero((ids == 0) != (lab == 0))
    if len(bad):
        i = int(rows[bad[0]])
        raise DataError(
            f"{folder} row {i} (file_id {file_ids[i]!r}): label {labels[i]} does not match generator "
            f"{generators[i]!r} (real images have generator '' and label 0)"
        )
    groups = np.full(len(generators), -1, dtype=np.int64)
    groups[rows] = ids
    images = ArrowImages(root, split, on_bad_image=on_bad_image, stats=stats, groups=groups)
    return DetectionSplit(split, images, rows, lab, ids, [file_ids[i] for i in rows])


def _hash(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]


def build_aigenbench(
    *,
    name: str = "aigenbench",
    root: str | None = None,
    generators: str | None = None,
    generators_per_window: int = 4,
    benchmark_type: str = "cumulative",
    train_real_seed: int = 1337,
    val_balance_seed: int = VAL_BALANCE_SEED,
    val_shuffle_seed: int = VAL_SHUFFLE_SEED,
    val_pairing_seed: int = VAL_PAIRING_SEED,
    max_windows: int | None = None,
    eval_pipeline: Mapping[str, Any] | None = None,
    on_bad_image: str = "error",
) -> DetectionProtocol:
    """Build the protocol from ``root`` (a ``save_to_disk`` folder).

    ``generators`` is the timeline CSV (``None`` = the shipped v1.0.0 table; the twin
    writes its own next to its data and hands it over). ``max_windows`` truncates the timeline for quick runs.
    ``eval_pipeline`` holds the two logged choices of the mandatory evaluation chain
    (``jpeg_quality: code|uniform``, ``large_crop: random|central``).
    """
    from genattr.data.aigenbench.augment import mandatory_eval_pipeline

    eval_choices = {"jpeg_quality": "code", "large_crop": "random"} | dict(eval_pipeline or {})
    log.info("mandatory eval pipeline: %s (%s)", eval_choices, mandatory_eval_pipeline(**eval_choices))
    if benchmark_type not in BENCHMARK_TYPES:
        raise ConfigError(f"data.benchmark_type={benchmark_type!r}; expected one of {list(BENCHMARK_TYPES)}")
    folder = Path(require_root(root, "AI-GenBench")).expanduser()
    if not folder.is_dir():
        raise DataError(f"data.root={root} does not exist; expected the AI-GenBench save_to_disk folder")
    timeline = Timeline.from_table(generators, generators_per_window)
    if max_windows is not None:
        timeline = Timeline(timeline.windows[: int(max_windows)], timeline.dates)
    check_bad_image_policy(on_bad_image)
    stats = BadImageStats.for_policy(on_bad_image)
    train = _read_split(folder, "train", timeline, on_bad_image, stats)
    val = _read_split(folder, "validation", timeline, on_bad_image, stats)
    if stats.total:
        log.warning("skipped %d bad images (data.on_bad_image=skip): %s", stats.total, stats.counts)
    val = val.take(select_validation(val.generator_ids, seed=val_balance_seed))
    val = val.take(shuffled_order(len(val), val_shuffle_seed))
    pairing = pair_reals(val.generator_ids, seed=val_pairing_seed)
    window_gen_ids = [[timeline.generator_id(g) for g in w] for w in timeline.windows]
    window_rows = allot_training_rows(train.generator_ids, window_gen_ids, seed=train_real_seed)
    real_ids = [f for f, g in zip(train.file_ids, train.generator_ids, strict=True) if g == 0]
    info = {
        "root": str(folder),
        "windows": [list(w) for w in timeline.windows],
        "generator_id_to_name": list(timeline.id_to_name),
        "n_train": len(train),
        "n_validation": len(val),
        "window_train_sizes": [len(r) for r in window_rows],
        "train_real_file_id_sha256": _hash(real_ids),
        "validation_file_id_sha256": _hash(val.file_ids),
        "benchmark_type": benchmark_type,
        "eval_pipeline": eval_choices,
        "bad_images": stats.as_dict(),
        "on_bad_image": on_bad_image,
    }
    log.info("AI-GenBench: %d windows %s", len(timeline.windows), info["window_train_sizes"])
    return DetectionProtocol(
        name=name,
        source="real",
        root=folder,
        timeline=timeline,
        train=train,
        window_rows=window_rows,
        validation=val,
        pairing=pairing,
        benchmark_type=benchmark_type,
        info=info,
        bad_images=stats,
    )
