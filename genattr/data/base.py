"""Protocol objects handed from a dataset builder to a method.

A builder (``conf/data/*.yaml`` ``_target_``) returns one of these; a method only
ever sees this object, never paths or loader details, so the same method code runs
on a real dataset and on its synthetic twin.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch.utils.data import Dataset

from genattr.data.images import BadImageStats
from genattr.utils.errors import ConfigError


def require_root(root: str | Path | None, dataset: str) -> str | Path:
    """``root``, or one sentence: builders read folders; the run turns ``data.root: null`` into a twin's folder."""
    if root is None:
        raise ConfigError(
            f"the {dataset} loader needs a folder (data.root); data.root=null is turned into the synthetic twin's "
            "folder by genattr.run (genattr.twins.materialize), not by the loader"
        )
    return root


@dataclass
class Task:
    """One step of a continual scenario: its classes and its train / test sets."""

    index: int
    name: str
    classes: tuple[int, ...]
    train: Dataset
    test: Dataset


@dataclass
class ContinualProtocol:
    """A class-incremental scenario: tasks in order, each adding new classes."""

    kind: ClassVar[str] = "continual"
    name: str
    tasks: list[Task]
    source: str  # "twin" or "real"
    root: Path
    n_classes: int
    info: dict[str, Any] = field(default_factory=dict)
    #: images left out under ``data.on_bad_image=skip``; read at the end, it holds the decode-time skips too
    bad_images: BadImageStats | None = None

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]
