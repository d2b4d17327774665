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

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]
