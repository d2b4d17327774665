"""The small contract between ``genattr.run`` and a method.

A method receives a built protocol object (tasks, windows, splits) and a
:class:`RunContext`, and returns a :class:`Report`. It never reads the config tree,
paths or environment itself, so it can be driven from tests and benchmarks directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from accelerate import Accelerator

    from genattr.engine.checkpoint import Checkpointer
    from genattr.tracking.base import Tracker


@dataclass
class RunContext:
    """Everything a method needs from the outside world."""

    accelerator: Accelerator
    tracker: Tracker
    output_dir: Path
    checkpoints: Checkpointer
    seed: int
    stop_after_task: int | None = None
    #: Hash of the settings that shape results; a checkpoint from other settings is refused.
    config_fingerprint: str = ""


@dataclass
class Report:
    """What a method hands back: flat metrics, the results.json body, artifact files."""

    metrics: dict[str, float]
    results: dict[str, Any]
    artifacts: list[Path] = field(default_factory=list)
    summary: str = ""
    completed: bool = True


class Method(Protocol):
    name: str
    supports: tuple[str, ...]

    def run(self, protocol: Any, ctx: RunContext) -> Report: ...
