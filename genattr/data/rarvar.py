"""The model-tracer task on disk (RAR / VAR variants + outliers): folders, images, checkpoints.

Layout (``specs/prada.md`` §1): ``train/<8 variant labels>/*.png`` (no outlier folder), ``val/<9 labels>/*.png``,
a flat ``test/*.png`` and optionally a hidden answer key ``image_name,label``. Images are loaded **as is**: no
resize, no crop, no colour conversion beyond dropping an alpha channel, because any resampling of a native
generator output destroys the codebook alignment that Stage 1 measures (spec §5, §10). The protocol also carries
the local tokenizer / generator checkpoint files of both families; for the synthetic twin they come from the twin
folder (``checkpoints/models.json``), for the real task from ``data.checkpoint_dir`` + the model config.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from genattr.data.base import require_root
from genattr.data.images import BadImageStats, image_problem, next_same_label
from genattr.utils.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: The 9 labels in the order every team script (and the leaderboard) uses.
LABELS: tuple[str, ...] = ("var16", "var20", "var24", "var30", "rarb", "rarl", "rarxl", "rarxxl", "outlier")
OUTLIER = "outlier"
#: Family order; ties in the Stage 1 rule go to the FIRST family here (RAR, spec §4 "ties go to RAR").
FAMILIES: tuple[str, ...] = ("rar", "var")
VARIANTS: dict[str, tuple[str, ...]] = {"var": LABELS[0:4], "rar": LABELS[4:8]}
FAMILY_OF: dict[str, str] = {v: f for f, vs in VARIANTS.items() for v in vs} | {OUTLIER: OUTLIER}
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def family_of(label: str) -> str:
    """``var`` / ``rar`` / ``outlier`` of a label."""
    return FAMILY_OF[label]


@dataclass
class FamilyModels:
    """How to build one family's tokenizer and its four generators, and which local files hold their weights."""

    family: str
    tokenizer: dict[str, Any]
    tokenizer_checkpoint: Path
    generators: dict[str, dict[str, Any]]
    generator_checkpoints: dict[str, Path]


@dataclass
class ImageSplit:
    """File names, paths and (if known) labels of one split; labels are ``None`` for an unlabelled test set."""

    name: str
    paths: list[Path]
    labels: list[str] | None
    #: ``data.on_bad_image``: under ``skip`` a file that fails at decode time is counted in ``stats`` and replaced
    #: by the next decodable image of its label (of the split, for the unlabelled test set)
    on_bad_image: str = "error"
    stats: BadImageStats | None = None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.paths]

    def load(self, indices: Sequence[int] | None = None) -> torch.Tensor:
        """uint8 images ``[N, 3, H, W]`` decoded as they are on disk (see :func:`load_png`)."""
        idx = range(len(self.paths)) if indices is None else indices
        if len(idx) == 0:
            return torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
        return torch.stack([self._decode(int(i)) for i in idx])

    def _decode(self, i: int) -> torch.Tensor:
        try:
            return load_png(self.paths[i])
        except DataError as err:
            if self.on_bad_image != "skip" or self.stats is None:
                raise
            self.stats.record_decode(self.paths[i], err.__cause__ or err)
        keys = np.asarray([0] * len(self.paths) if self.labels is None else self.labels)
        for j in next_same_label(keys, i):
            try:
                return load_png(self.paths[j])
            except DataError as err:
                self.stats.record_decode(self.paths[j], err.__cause__ or err)
        raise DataError(
            f"{self.paths[i]} could not be decoded and no other image of its label in {self.name} decodes either "
            "(data.on_bad_image=skip replaces a bad file by one of them); check the files of that split"
        )


@dataclass
class TracingProtocol:
    """The model-tracer task: three splits, the expected image size and the local model checkpoints."""

    kind: ClassVar[str] = "tracing"
    name: str
    source: str  # "twin" or "real"
    root: Path
    image_size: int
    train: ImageSplit
    val: ImageSplit
    test: ImageSplit
    models: dict[str, FamilyModels]
    #: hidden metadata of the twin: split -> image name -> row of ``hidden/metadata.csv`` (None on the real task)
    hidden: dict[str, dict[str, dict[str, str]]] | None = None
    hidden_dir: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)
    #: images left out under ``data.on_bad_image=skip``; read at the end, it holds the decode-time skips too
    bad_images: BadImageStats | None = None

    @property
    def labels(self) -> tuple[str, ...]:
        return LABELS

    def split(self, name: str) -> ImageSplit:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def load_png(path: str | Path) -> torch.Tensor:
    """Decode ``path`` to uint8 ``[3, H, W]`` without resampling; a decode failure is a ``DataError``."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode != "RGB":
                im = im.convert("RGB")  # drops alpha / expands grey; never resamples
            arr = np.asarray(im, dtype=np.uint8)
    except _DECODE_ERRORS as err:
        raise DataError(
            f"{path} could not be decoded as an image ({err}); replace or delete it, or set data.on_bad_image=skip"
        ) from err
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def _image_problem(path: Path, size: int) -> tuple[str, str] | None:
    """Scan-time check from the header and the last bytes: readable, complete, exactly ``size``×``size``."""
    try:
        problem = image_problem(path, size=path.stat().st_size, name=str(path), exact_size=size)
    except OSError as err:
        problem = ("unreadable", f"{path} could not be opened ({err})")
    if problem is not None and problem[0] == "wrong_size":
        problem = (
            "wrong_size",
            f"{problem[1].replace('the images must be', 'the task images are')} (data.image_size); images are "
            "never resized because resampling destroys the codebook alignment the tracer measures",
        )
    return problem


def _images_in(folder: Path, size: int, on_bad_image: str, stats: BadImageStats) -> list[Path]:
    """The usable files of ``folder`` (sorted); a bad one is an error naming it, or skipped and counted."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    kept = []
    for p in files:
        problem = _image_problem(p, size)
        if problem is None:
            kept.append(p)
        elif on_bad_image == "skip":
            stats.record(problem[0], p)
        else:
            raise DataError(f"{problem[1]}. Replace or delete it, or set data.on_bad_image=skip (skips are counted)")
    if not kept:
        what = "usable images" if files else "images"
        raise DataError(f"{folder} holds no {what}; every label folder and the test folder need at least one")
    return kept


def _labelled_split(
    root: Path, split: str, allowed: Sequence[str], size: int, on_bad_image: str, stats: BadImageStats
) -> ImageSplit:
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"{folder} does not exist; expected the {split} split with one sub-folder per label")
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    for name in found:
        if name == OUTLIER and OUTLIER not in allowed:
            raise DataError(f"{folder / name} is an outlier folder in {split}; the {split} split has no outliers")
        if name not in allowed:
            raise DataError(f"{folder / name} is not a label folder; {split} holds only {', '.join(allowed)}")
    stray = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if stray:
        raise DataError(f"{folder / stray[0]} lies directly in {split}/; {split} images belong in label folders")
    missing = [a for a in allowed if a not in found]
    if missing:
        raise DataError(f"{folder / missing[0]} does not exist; {split} needs the folders {', '.join(allowed)}")
    paths: list[Path] = []
    labels: list[str] = []
    for label in allowed:
        imgs = _images_in(folder / label, size, on_bad_image, stats)
        paths += imgs
        labels += [label] * len(imgs)
    return ImageSplit(split, paths, labels, on_bad_image, stats)


def _test_split(root: Path, size: int, labels_csv: Path | None, on_bad_image: str, stats: BadImageStats) -> ImageSplit:
    folder = root / "test"
    if not folder.is_dir():
        raise DataError(f"{folder} does not exist; expected the flat test folder of images")
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir())
    if subdirs:
        raise DataError(f"{subdirs[0]} is a sub-folder of test/; the test split is one flat folder of images")
    paths = _images_in(folder, size, on_bad_image, stats)
    labels = None
    if labels_csv is not None and labels_csv.is_file():
        key = read_labels_csv(labels_csv)
        absent = sorted(n for n in key if not (folder / n).is_file())
        if absent:
            raise DataError(
                f"{labels_csv} lists {folder / absent[0]} (and {len(absent) - 1} more), which does not exist; "
                "the answer key and the test folder must hold the same images"
            )
        missing = [p.name for p in paths if p.name not in key]
        if missing:
            raise DataError(f"{labels_csv} has no label for {missing[0]} (and {len(missing) - 1} more test files)")
        labels = [key[p.name] for p in paths]
    return ImageSplit("test", paths, labels, on_bad_image, stats)


def read_labels_csv(path: Path) -> dict[str, str]:
    """``image_name,label`` rows -> dict; every label must be one of :data:`LABELS`."""
    out: dict[str, str] = {}
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"image_name", "label"} <= set(reader.fieldnames):
            raise DataError(f"{path} must have the header image_name,label")
        for row in reader:
            if row["label"] not in LABELS:
                raise DataError(f"{path}: {row['image_name']} has the unknown label {row['label']!r}")
            out[row["image_name"]] = row["label"]
    return out


def _checkpoint(base: Path, rel: str | None, key: str) -> Path:
    if not rel:
        raise ConfigError(f"{key} is not set; it must name the local checkpoint file")
    path = Path(rel).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise ConfigError(f"{key}={path} does not exist; the tracer needs this local checkpoint file")
    return path


def parse_models(spec: Mapping[str, Any], base: Path, prefix: str) -> dict[str, FamilyModels]:
    """Read the ``models.json`` / ``model`` structure and check that every checkpoint file exists.

    Structure: ``{family: {"tokenizer": {_target_..}, "tokenizer_checkpoint": file,
    "variants": {label: {"generator": {_target_..}, "checkpoint": file}}}}`` for both families.
    """
    out: dict[str, FamilyModels] = {}
    for family in FAMILIES:
        if family not in spec:
            raise ConfigError(f"{prefix}.{family} is missing; both families (rar, var) need a tokenizer + 4 generators")
        fam = spec[family]
        variants = fam.get("variants") or {}
        unknown = sorted(set(variants) - set(VARIANTS[family]))
        if unknown or len(variants) != 4:
            raise ConfigError(
                f"{prefix}.{family}.variants must be exactly {list(VARIANTS[family])}, got {sorted(variants)}"
            )
        out[family] = FamilyModels(
            family=family,
            tokenizer=dict(fam["tokenizer"]),
            tokenizer_checkpoint=_checkpoint(
                base, fam.get("tokenizer_checkpoint"), f"{prefix}.{family}.tokenizer_checkpoint"
            ),
            generators={v: dict(variants[v]["generator"]) for v in VARIANTS[family]},
            generator_checkpoints={
                v: _checkpoint(base, variants[v].get("checkpoint"), f"{prefix}.{family}.variants.{v}.checkpoint")
                for v in VARIANTS[family]
            },
        )
    return out


def _read_hidden(root: Path) -> dict[str, dict[str, dict[str, str]]] | None:
    meta = root / "hidden" / "metadata.csv"
    if not meta.is_file():
        return None
    out: dict[str, dict[str, dict[str, str]]] = {}
    with open(meta, newline="") as fh:
        for row in csv.DictReader(fh):
            out.setdefault(row["split"], {})[row["image_name"]] = row
    return out


def load_rarvar(
    root: str | Path,
    *,
    image_size: int = 256,
    models: Mapping[str, Any] | None = None,
    checkpoint_dir: str | Path | None = None,
    test_labels: str | None = "test_labels.csv",
    name: str = "rarvar",
    on_bad_image: str = "error",
) -> TracingProtocol:
    """Read and check the task folder; ``models`` (model-config structure) names the checkpoint files."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root={root} does not exist; point it at the task folder (train/ val/ test/)")
    size = int(image_size)
    stats = BadImageStats.for_policy(on_bad_image)
    train = _labelled_split(root, "train", LABELS[:8], size, on_bad_image, stats)
    val = _labelled_split(root, "val", LABELS, size, on_bad_image, stats)
    labels_csv = None
    if test_labels:
        labels_csv = Path(test_labels).expanduser()
        labels_csv = labels_csv if labels_csv.is_absolute() else root / labels_csv
    test = _test_split(root, size, labels_csv, on_bad_image, stats)
    manifest = root / "checkpoints" / "models.json"
    if models is None and manifest.is_file():
        models, base, prefix = json.loads(manifest.read_text()), manifest.parent, str(manifest)
    else:
        if not models:
            raise ConfigError(
                "model (the tracer's model config, e.g. model=prada_real) has no families; the tracer needs the "
                "tokenizer and generator structure of both families"
            )
        base = Path(checkpoint_dir).expanduser() if checkpoint_dir else root / "checkpoints"
        prefix = "model"
    parsed = parse_models(models, base, prefix)
    hidden = _read_hidden(root)
    info = {
        "root": str(root),
        "image_size": size,
        "n_train": len(train),
        "n_val": len(val),
        "n_test": len(test),
        "test_labels": labels_csv is not None and test.labels is not None,
        "hidden_metadata": hidden is not None,
        "checkpoints": {f: str(m.tokenizer_checkpoint.parent) for f, m in parsed.items()},
        "bad_images": stats.as_dict(),
        "on_bad_image": on_bad_image,
    }
    if stats.total:
        log.warning("skipped %d bad images (data.on_bad_image=skip): %s", stats.total, stats.counts)
    log.info("model-tracer task from %s: %s", root, info)
    return TracingProtocol(
        name=name,
        source="real",
        root=root,
        image_size=size,
        train=train,
        val=val,
        test=test,
        models=parsed,
        hidden=hidden,
        hidden_dir=(root / "hidden") if hidden is not None else None,
        info=info,
        bad_images=stats,
    )


def build_rarvar(
    *,
    name: str,
    root: str | None,
    image_size: int,
    models: Mapping[str, Any] | None,
    checkpoint_dir: str | None,
    test_labels: str | None,
    on_bad_image: str,
) -> TracingProtocol:
    """``conf/data/rarvar.yaml`` ``_target_``: the task folder (a twin's folder is read the same way)."""
    return load_rarvar(
        require_root(root, "model-tracer"),
        image_size=image_size,
        models=models,
        checkpoint_dir=checkpoint_dir,
        test_labels=test_labels,
        name=name,
        on_bad_image=on_bad_image,
    )
