"""CDDB (Continual Deepfake Detection Benchmark) as a class-incremental protocol.

Layout and label rules follow LoRAX / CDDB-DyTox (``specs/lorax_cddb.md`` 2.1-2.3):
``<root>/<task>/{train,val}/[<subcategory>/]{0_real,1_fake}/*``, task ``i`` adds the
classes real = 2i and fake = 2i+1, sub-categories merge into one real and one fake
class, and ``val`` is the test set. With ``root: null`` the run builds the synthetic twin
(:mod:`genattr.twins.cddb`) and this same loader reads it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from genattr.data.base import ContinualProtocol, Task, require_root
from genattr.data.images import (
    BadImageStats,
    ImageListDataset,
    Sample,
    check_bad_image_policy,
    scan_image_folder,
)
from genattr.data.transforms import test_transform, train_transform
from genattr.utils.errors import ConfigError, DataError

log = logging.getLogger(__name__)

CDDB_TASKS: tuple[str, ...] = (
    "gaugan",
    "biggan",
    "cyclegan",
    "imle",
    "deepfake",
    "crn",
    "wild",
    "glow",
    "stargan_gf",
    "stylegan",
    "whichfaceisreal",
    "san",
)
SUBCATEGORIES: dict[str, list[str]] = {
    "cyclegan": ["apple", "horse", "orange", "summer", "winter", "zebra"],
    "stylegan": ["bedroom", "car", "cat"],
    "glow": ["black_hair", "blond_hair", "brown_hair"],
    "stargan_gf": ["black_hair", "blond_hair", "brown_hair"],
}
CLASS_DIRS = ("0_real", "1_fake")  # index = offset of the label within the task


def _subcategory_dirs(split_dir: Path) -> list[Path]:
    """The folders holding ``0_real``/``1_fake`` for one split: itself, or its sub-categories.

    Detection mirrors the original loader: a flat split has ``0_real`` directly; any
    other split is a set of sub-category folders, each of which must be complete.
    """
    if not split_dir.is_dir():
        raise DataError(
            f"{split_dir} does not exist; expected the split folder holding "
            f"{CLASS_DIRS[0]}/ and {CLASS_DIRS[1]}/ (or sub-category folders that do)"
        )
    if (split_dir / CLASS_DIRS[0]).is_dir():
        groups = [split_dir]
    else:
        groups = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not groups:
            raise DataError(
                f"{split_dir} holds neither {CLASS_DIRS[0]}/ nor sub-category folders; "
                f"expected {CLASS_DIRS[0]}/ and {CLASS_DIRS[1]}/ inside it"
            )
    for group in groups:
        for cls in CLASS_DIRS:
            if not (group / cls).is_dir():
                raise DataError(
                    f"{group / cls} does not exist; expected the "
                    f"{'real' if cls == CLASS_DIRS[0] else 'fake'} images of {group} there"
                )
    return groups


def _load_split(
    split_dir: Path,
    *,
    task_index: int,
    crop: int,
    on_bad_image: str,
    stats: BadImageStats,
) -> tuple[list[Sample], dict[str, int], int]:
    """One task split: samples (real then fake, sorted), counts, #sub-categories."""
    groups = _subcategory_dirs(split_dir)
    samples: list[Sample] = []
    counts: dict[str, int] = {}
    for offset, cls in enumerate(CLASS_DIRS):
        paths = [
            p
            for group in groups
            for p in scan_image_folder(group / cls, min_size=crop, on_bad_image=on_bad_image, stats=stats)
        ]
        label = 2 * task_index + offset
        samples += [Sample(str(p), label, task_index) for p in sorted(paths)]
        counts[cls.split("_", 1)[1]] = len(paths)
    return samples, counts, len(groups) if groups != [split_dir] else 0


def _check_tasks(tasks: Sequence[str]) -> list[str]:
    tasks = [str(t) for t in tasks]
    unknown = [t for t in tasks if t not in CDDB_TASKS]
    if unknown:
        raise ConfigError(f"unknown CDDB task(s) {unknown} in data.tasks; valid: {', '.join(CDDB_TASKS)}")
    if not tasks or len(set(tasks)) != len(tasks):
        raise ConfigError(f"data.tasks must list each CDDB task at most once and not be empty, got {tasks}")
    return tasks


def build_cddb(
    *,
    name: str,
    tasks: Sequence[str],
    root: str | None,
    crop: int,
    on_bad_image: str = "error",
    splits: Mapping[str, str] | None = None,
) -> ContinualProtocol:
    """Build a CDDB scenario (``conf/data/cddb_*.yaml`` ``_target_``).

    ``splits`` maps the protocol's ``train`` / ``test`` to on-disk folders and defaults
    to CDDB's ``train`` / ``val``. Every image must be at least ``crop`` on both sides,
    because LoRAX crops at native resolution.
    """
    task_names = _check_tasks(tasks)
    check_bad_image_policy(on_bad_image)
    split_dirs = {"train": "train", "test": "val", **dict(splits or {})}
    crop = int(crop)
    data_root = Path(require_root(root, "CDDB")).expanduser()
    if not data_root.is_dir():
        raise DataError(
            f"data.root={root} does not exist; point it at the folder holding "
            f"{', '.join(t + '/' for t in CDDB_TASKS[:3])} ... or set data.root=null for the synthetic twin"
        )

    stats = BadImageStats.for_policy(on_bad_image)
    counts: dict[str, dict[str, dict[str, int]]] = {}
    n_sub: dict[str, int] = {}
    task_objs: list[Task] = []
    for i, task in enumerate(task_names):
        task_dir = data_root / task
        if not task_dir.is_dir():
            raise DataError(
                f"{task_dir} does not exist; expected CDDB task {task!r} there with "
                f"{split_dirs['train']}/ and {split_dirs['test']}/ folders"
            )
        sets: dict[str, ImageListDataset] = {}
        counts[task] = {}
        for role, transform in (
            ("train", train_transform(crop)),
            ("test", test_transform(crop)),
        ):
            folder = split_dirs[role]
            samples, counts[task][folder], n_sub[task] = _load_split(
                task_dir / folder,
                task_index=i,
                crop=crop,
                on_bad_image=on_bad_image,
                stats=stats,
            )
            sets[role] = ImageListDataset(samples, transform, on_bad_image=on_bad_image, stats=stats)
        log.info(
            "CDDB task %d %s (classes %d/%d, %d sub-categories): %s",
            i,
            task,
            2 * i,
            2 * i + 1,
            n_sub[task],
            counts[task],
        )
        task_objs.append(Task(i, task, (2 * i, 2 * i + 1), sets["train"], sets["test"]))

    if stats.total:
        log.warning(
            "skipped %d bad images (data.on_bad_image=skip): %s",
            stats.total,
            stats.counts,
        )
    info: dict[str, Any] = {
        "counts": counts,
        "subcategories": n_sub,
        "bad_images": stats.as_dict(),
        "crop": crop,
        "splits": split_dirs,
        "on_bad_image": on_bad_image,
    }
    return ContinualProtocol(
        name=name,
        tasks=task_objs,
        source="real",
        root=data_root,
        n_classes=2 * len(task_objs),
        info=info,
        bad_images=stats,
    )
