"""The continual-forgetting protocol (GS-LoRA): class order, tasks, training subsets.

A dataset family (``faces``, ``imagenet100``) only reads ``{train,test}/<class>/*`` into
image lists; this module turns them into the scenario of ``specs/gslora.md`` section 3:
the 100 classes are shuffled with ``random.seed(1337)`` and task ``t`` forgets
``order[F - t*P : F - t*P + P]`` while ``order[0 : F - t*P]`` remain. Training only ever
sees a subset (``data_ratio`` of the images or ``few_shot`` images per class). As in the
original (``train/train_own_forget_cl.py``: ``torch.randperm`` on the task's forget set and on
its remain set, every task), the subset is drawn anew for each task by default; the draws
come from a generator seeded with ``(subset_seed, task)``, so every method gets the same
images. ``subset_per_task=false`` draws one subset for the whole run instead.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from genattr.data.base import require_root
from genattr.data.images import BadImageStats, ImageListDataset, Sample, scan_image_folder
from genattr.utils.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "test")


@dataclass(frozen=True)
class ForgetTask:
    """One forgetting step: the classes to forget now, those kept, those forgotten before."""

    index: int
    name: str
    forget: tuple[int, ...]
    remain: tuple[int, ...]
    old: tuple[int, ...]


@dataclass
class ForgettingProtocol:
    """Everything a forgetting method needs: the full splits, the task list and the subsets.

    ``task_subsets[t]`` = (remain, forget) indices into ``train``: what task ``t`` trains on;
    ``train_subset`` is their union, the images any method may touch (the data budget);
    ``missing`` classes have no image in it (the missing-class protocol).
    """

    kind: ClassVar[str] = "forgetting"
    name: str
    source: str
    root: Path
    n_classes: int
    class_names: list[str]
    order: list[int]
    tasks: list[ForgetTask]
    train: ImageListDataset
    test: ImageListDataset
    train_subset: np.ndarray
    task_subsets: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    missing: tuple[int, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)
    #: images left out under ``data.on_bad_image=skip``; read at the end, it holds the decode-time skips too
    bad_images: BadImageStats | None = None

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task_subset(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """(remain, forget) indices into ``train`` that task ``t`` trains on."""
        return self.task_subsets[t]

    def train_of(self, classes: Sequence[int]) -> ImageListDataset:
        """The budgeted training images of ``classes``."""
        keep = np.isin(self.train.labels[self.train_subset], np.asarray(classes, dtype=np.int64))
        return self.train.subset(self.train_subset[keep])

    def test_of(self, classes: Sequence[int]) -> ImageListDataset:
        """Every test image of ``classes`` (the evaluation uses the full test split)."""
        return self.test.subset(np.flatnonzero(np.isin(self.test.labels, np.asarray(classes, dtype=np.int64))))


def class_order(n_classes: int, seed: int) -> list[int]:
    """``random.seed(seed); random.shuffle(range(n))``, as the original scripts do."""
    order = list(range(n_classes))
    random.Random(seed).shuffle(order)
    return order


def make_tasks(order: Sequence[int], *, num_tasks: int, first_classes: int, per_task: int) -> list[ForgetTask]:
    """Task ``t`` forgets ``order[F - tP : F - tP + P]``; ``order[:F - tP]`` remain.

    Old = the classes forgotten by earlier tasks; classes past ``F + P`` (when F + P < n) are
    in no set: never forgotten, never trained on.
    """
    n = len(order)
    if per_task < 1 or num_tasks < 1:
        raise ConfigError(f"data.scenario needs num_tasks >= 1 and per_task >= 1, got {num_tasks}, {per_task}")
    if first_classes + per_task > n:
        raise ConfigError(
            f"data.scenario.first_classes={first_classes} + per_task={per_task} exceeds the {n} classes of the data"
        )
    if first_classes - (num_tasks - 1) * per_task < 0:
        raise ConfigError(
            f"data.scenario: {num_tasks} tasks of {per_task} classes do not fit below first_classes={first_classes}; "
            "lower num_tasks or per_task"
        )
    tasks = []
    for t in range(num_tasks):
        cut = first_classes - t * per_task
        forget = tuple(order[cut : cut + per_task])
        tasks.append(
            ForgetTask(
                index=t,
                name=f"{cut + per_task}-{per_task}",
                forget=forget,
                remain=tuple(order[:cut]),
                old=tuple(order[cut + per_task : first_classes + per_task]),
            )
        )
    return tasks


def select_subset(
    labels: np.ndarray,
    *,
    data_ratio: float | None,
    few_shot: int | None,
    ratio_over_split: bool,
    missing: Sequence[int],
    seed: int,
) -> np.ndarray:
    """Indices of the training images a method may use, sorted.

    ``few_shot`` wins over ``data_ratio``. With ``ratio_over_split`` (the original's
    ``randperm`` over the whole split) the per-class counts vary; otherwise the ratio is
    taken within each class. ``missing`` classes lose all their images.
    """
    rng = np.random.default_rng(seed)
    n = len(labels)
    if few_shot is not None:
        if int(few_shot) < 1:
            raise ConfigError(f"data.scenario.few_shot={few_shot} must be >= 1 or null")
        idx = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[: int(few_shot)] for c in np.unique(labels)])
    elif data_ratio is None or float(data_ratio) >= 1.0:
        idx = np.arange(n)
    else:
        ratio = float(data_ratio)
        if ratio <= 0:
            raise ConfigError(f"data.scenario.data_ratio={data_ratio} must be in (0, 1]")
        if ratio_over_split:
            idx = rng.permutation(n)[: max(1, int(n * ratio))]
        else:
            idx = np.concatenate(
                [
                    rng.permutation(ids)[: max(1, round(len(ids) * ratio))]
                    for ids in (np.flatnonzero(labels == c) for c in np.unique(labels))
                ]
            )
    idx = np.sort(idx)
    if missing:
        idx = idx[~np.isin(labels[idx], np.asarray(missing, dtype=np.int64))]
    return idx


def draw_task_subset(
    labels: np.ndarray,
    classes: Sequence[int],
    *,
    data_ratio: float | None,
    few_shot: int | None,
    ratio_over_split: bool,
    rng: np.random.Generator,
) -> np.ndarray:
    """Indices (sorted) of the training images of ``classes`` one task may use.

    The original's draw: ``randperm(n)[: int(n * data_ratio)]`` over the images of the class
    set (``ratio_over_split``; otherwise the ratio within each class), or ``few_shot``
    images per class (``create_few_shot_dataset``), which wins over ``data_ratio``.
    """
    pool = np.flatnonzero(np.isin(labels, np.asarray(list(classes), dtype=np.int64)))
    if few_shot is not None:
        if int(few_shot) < 1:
            raise ConfigError(f"data.scenario.few_shot={few_shot} must be >= 1 or null")
        per = [rng.permutation(pool[labels[pool] == c])[: int(few_shot)] for c in np.unique(labels[pool])]
        idx = np.concatenate(per) if per else pool[:0]
    elif data_ratio is None or float(data_ratio) >= 1.0:
        idx = pool
    else:
        ratio = float(data_ratio)
        if ratio <= 0:
            raise ConfigError(f"data.scenario.data_ratio={data_ratio} must be in (0, 1]")
        if ratio_over_split:
            idx = rng.permutation(pool)[: int(len(pool) * ratio)]
        else:
            per = [
                rng.permutation(ids)[: max(1, round(len(ids) * ratio))]
                for ids in (pool[labels[pool] == c] for c in np.unique(labels[pool]))
            ]
            idx = np.concatenate(per) if per else pool[:0]
    return np.sort(idx)


def task_subsets(
    labels: np.ndarray,
    tasks: Sequence[ForgetTask],
    *,
    scenario: Mapping[str, Any],
    missing: Sequence[int],
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(remain, forget) training indices of every task, per ``data.scenario``.

    ``subset_per_task`` (the original): each task draws from its own forget and remain
    sets (missing classes left out of the pool), with a generator seeded by
    ``(subset_seed, task)``. Otherwise one subset for the run (:func:`select_subset`),
    cut to each task's classes.
    """
    seed = int(scenario["subset_seed"])
    kw = {
        "data_ratio": scenario["data_ratio"],
        "few_shot": scenario["few_shot"],
        "ratio_over_split": bool(scenario["ratio_over_split"]),
    }
    miss = set(int(c) for c in missing)
    out = []
    if bool(scenario["subset_per_task"]):
        for task in tasks:
            rng = np.random.default_rng([seed, task.index])
            forget = draw_task_subset(labels, task.forget, rng=rng, **kw)
            remain = draw_task_subset(labels, [c for c in task.remain if c not in miss], rng=rng, **kw)
            out.append((remain, forget))
        return out
    budget = select_subset(labels, missing=missing, seed=seed, **kw)
    for task in tasks:
        out.append(
            tuple(
                budget[np.isin(labels[budget], np.asarray(cls, dtype=np.int64))] for cls in (task.remain, task.forget)
            )
        )
    return out


def read_class_folders(
    root: Path,
    *,
    split: str,
    classes: Sequence[str],
    min_size: int,
    on_bad_image: str,
    stats: BadImageStats,
    transform: Callable[[Any], Any] | None,
) -> ImageListDataset:
    """``root/split/<class>/*`` with label = position of the class in ``classes``."""
    samples: list[Sample] = []
    for label, cls in enumerate(classes):
        folder = root / split / cls
        if not folder.is_dir():
            raise DataError(f"{folder} does not exist; every class of {root / 'train'} needs a folder in {split}/ too")
        paths = scan_image_folder(folder, min_size=min_size, on_bad_image=on_bad_image, stats=stats)
        samples += [Sample(str(p), label, 0) for p in paths]
    return ImageListDataset(samples, transform, on_bad_image=on_bad_image, stats=stats)


def class_folders(root: Path, layout_hint: str) -> list[str]:
    """Sorted class folder names under ``root/train`` (the ImageFolder label order)."""
    for split in SPLITS:
        if not (root / split).is_dir():
            raise DataError(f"{root / split} does not exist; expected the layout {layout_hint}")
    names = sorted(p.name for p in (root / "train").iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DataError(f"{root / 'train'} holds no class folders; expected the layout {layout_hint}")
    return names


#: every key of ``data.scenario`` (one default each, in ``conf/data/_forgetting_scenario.yaml``)
SCENARIO_KEYS = (
    "order_seed",
    "num_tasks",
    "first_classes",
    "per_task",
    "data_ratio",
    "subset_per_task",
    "ratio_over_split",
    "few_shot",
    "missing",
    "subset_seed",
)


def build_forgetting_protocol(
    *,
    name: str,
    source: str,
    root: Path,
    class_names: list[str],
    train: ImageListDataset,
    test: ImageListDataset,
    scenario: Mapping[str, Any],
    stats: BadImageStats,
    extra_info: Mapping[str, Any] | None = None,
) -> ForgettingProtocol:
    """Class order, tasks and the training subset from ``data.scenario``."""
    sc = dict(scenario)
    lacking = [k for k in SCENARIO_KEYS if k not in sc]
    if lacking:
        raise ConfigError(f"data.scenario lacks {lacking}; conf/data/_forgetting_scenario.yaml lists every key")
    n = len(class_names)
    order = class_order(n, int(sc["order_seed"]))
    tasks = make_tasks(
        order,
        num_tasks=int(sc["num_tasks"]),
        first_classes=int(sc["first_classes"]),
        per_task=int(sc["per_task"]),
    )
    n_missing = int(sc["missing"] or 0)
    if n_missing < 0 or n_missing > int(sc["first_classes"]) - (int(sc["num_tasks"]) - 1) * int(sc["per_task"]):
        raise ConfigError(f"data.scenario.missing={n_missing} must be >= 0 and leave them in every remaining set")
    missing = tuple(order[:n_missing])
    per_task = task_subsets(train.labels, tasks, scenario=sc, missing=missing)
    subset = np.unique(np.concatenate([np.concatenate(pair) for pair in per_task]))
    counts = np.bincount(train.labels[subset], minlength=n)
    log.info(
        "training subsets drawn %s (data.scenario.subset_per_task=%s; the original draws per task)",
        "per task" if bool(sc["subset_per_task"]) else "once per run",
        bool(sc["subset_per_task"]),
    )
    info = {
        "n_classes": n,
        "n_train": len(train),
        "n_test": len(test),
        "n_train_subset": int(len(subset)),
        "task_subset_sizes": [{"remain": int(len(r)), "forget": int(len(f))} for r, f in per_task],
        "subset_per_class_min_max": [int(counts.min()), int(counts.max())],
        "order": order,
        "tasks": [{"name": t.name, "forget": list(t.forget)} for t in tasks],
        "missing": list(missing),
        "scenario": {k: v for k, v in sc.items()},
        "bad_images": stats.as_dict(),
        **dict(extra_info or {}),
    }
    log.info(
        "%s (%s): %d classes, %d train (%d in the budget), %d test; tasks %s",
        name,
        source,
        n,
        len(train),
        len(subset),
        len(test),
        [t.name for t in tasks],
    )
    return ForgettingProtocol(
        name=name,
        source=source,
        root=root,
        n_classes=n,
        class_names=class_names,
        order=order,
        tasks=tasks,
        train=train,
        test=test,
        train_subset=subset,
        task_subsets=per_task,
        missing=missing,
        info=info,
        bad_images=stats,
    )


def identity_data_root(root: str | None, *, label: str, expected: str) -> Path:
    """``root`` as a folder, after checking it exists (a twin's root is a folder like any other)."""
    data_root = Path(require_root(root, label)).expanduser()
    if not data_root.is_dir():
        raise DataError(f"data.root={root} does not exist; expected {expected}, or data.root=null for the twin")
    return data_root


def protocol_from_class_folders(
    *,
    name: str,
    data_root: Path,
    classes: list[str],
    transform: Callable[[Any], Any],
    scenario: Mapping[str, Any],
    on_bad_image: str,
    info: dict[str, Any],
) -> ForgettingProtocol:
    """Read ``train``/``test`` class folders (bad-image policy applied) into a forgetting protocol."""
    stats = BadImageStats.for_policy(on_bad_image)
    sets = {
        split: read_class_folders(
            data_root,
            split=split,
            classes=classes,
            min_size=1,
            on_bad_image=on_bad_image,
            stats=stats,
            transform=transform,
        )
        for split in ("train", "test")
    }
    return build_forgetting_protocol(
        name=name,
        source="real",
        root=data_root,
        class_names=classes,
        train=sets["train"],
        test=sets["test"],
        scenario=scenario,
        stats=stats,
        extra_info=info,
    )
