"""The experiment-tracker interface the engine talks to, and a no-op implementation.

The engine only depends on this Protocol so that ``tracking=none`` (tests, quick
debugging, non-zero ranks) needs no MLflow database and no ``if tracker:`` branches.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")


@runtime_checkable
class Tracker(Protocol):
    """What a run needs from a tracking backend."""

    run_id: str | None

    def start(
        self,
        *,
        run_name: str,
        tags: Mapping[str, str],
        params: Mapping[str, Any],
        run_id: str | None = None,
        parent_run_id: str | None = None,
    ) -> str | None:
        """Create a run, or resume ``run_id`` (a requeued job); return its id.

        ``parent_run_id`` links a sweep job to its sweep run across processes,
        where in-process nested runs are impossible.
        """
        ...

    def attach_spool(self, path: str | Path) -> None:
        """Keep calls the backend cannot take now in ``path`` (in the run's folder) and replay them later."""
        ...

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log numeric metrics at ``step`` (the task index for per-task metrics)."""
        ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a local file or folder under ``artifact_path``."""
        ...

    def log_dict(self, obj: dict[str, Any], artifact_file: str) -> None:
        """Store a dict as a JSON/YAML artifact (format from the file extension)."""
        ...

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run terminated with ``FINISHED``, ``FAILED`` or ``KILLED``."""
        ...

    def describe(self) -> str:
        """One line telling a human where the run lives and how to look at it."""
        ...


class NullTracker:
    """Tracker that records nothing, for ``tracking=none`` and non-zero ranks."""

    def __init__(self) -> None:
        """Start with no run, like a real tracker before ``start``."""
        self.run_id: str | None = None

    def start(
        self,
        *,
        run_name: str,
        tags: Mapping[str, str],
        params: Mapping[str, Any],
        run_id: str | None = None,
        parent_run_id: str | None = None,
    ) -> str | None:
        """Echo a resumed run id so checkpoints keep it; otherwise there is no run."""
        self.run_id = run_id
        return run_id

    def attach_spool(self, path: str | Path) -> None:
        """Nothing is ever sent, so nothing waits."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Discard metrics."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Discard artifacts."""

    def log_dict(self, obj: dict[str, Any], artifact_file: str) -> None:
        """Discard dict artifacts."""

    def end(self, status: str = "FINISHED") -> None:
        """Nothing to close; still validate ``status`` so typos surface in tests."""
        if status not in RUN_STATUSES:
            raise ValueError(f"status must be one of {RUN_STATUSES}, got {status!r}")

    def describe(self) -> str:
        """Say plainly that nothing is tracked, so nobody searches for a missing run."""
        return "tracking disabled (tracking=none): metrics are only in the job log and output dir"
