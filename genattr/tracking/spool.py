"""Tracking calls that could not reach MLflow, kept in order on disk until they can be sent.

A multi-hour job must never die, or lose a metric, because the tracking server restarted: a call that fails with
a transient error (connection refused, timeout, 5xx, a locked SQLite file) is written to a JSON-lines spool in
the run's folder and replayed, in order, once the server answers again. The file outlives the process, so a job
killed during an outage replays it when it is resumed, or ``python -m genattr.tracking.replay <run dir>`` does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from genattr.utils.io import atomic_write_text

#: the spool's file name in a run's output folder
SPOOL_FILE = "mlflow_spool.jsonl"

_TRANSIENT_TEXT = (
    "max retries exceeded",
    "connection refused",
    "connection aborted",
    "connection reset",
    "failed to establish",
    "name or service not known",
    "temporarily unavailable",
    "timed out",
    "read timeout",
    "remote end closed",
    "database is locked",
    "bad gateway",
    "service unavailable",
    "gateway timeout",
    "too many 500 error responses",
    "too many 502 error responses",
    "too many 503 error responses",
    "too many 504 error responses",
)


def is_transient(exc: BaseException) -> bool:
    """An outage or an overloaded server (worth retrying later), not a bad request (a bug to report now)."""
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    try:
        import requests

        if isinstance(exc, requests.ConnectionError | requests.Timeout):
            return True
    except ImportError:  # pragma: no cover - requests comes with mlflow
        pass
    if isinstance(exc, MlflowException | OSError):
        text = str(exc).lower()
        return any(t in text for t in _TRANSIENT_TEXT)
    return False


class Spool:
    """An ordered list of pending calls (``{"op": name, **arguments}``), mirrored to ``path`` when given."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.ops: list[dict[str, Any]] = []
        if self.path is not None and self.path.is_file():
            self.ops = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def __len__(self) -> int:
        return len(self.ops)

    def append(self, op: dict[str, Any]) -> None:
        self.ops.append(op)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as fh:  # one line per call: a crash mid-append loses at most that line
                fh.write(json.dumps(op, default=str) + "\n")
                fh.flush()
                os.fsync(fh.fileno())

    def drop_first(self, n: int) -> None:
        """Forget the first ``n`` calls (they were sent); the file is rewritten atomically, removed when empty."""
        self.ops = self.ops[n:]
        if self.path is None:
            return
        if self.ops:
            atomic_write_text(self.path, "".join(json.dumps(op, default=str) + "\n" for op in self.ops))
        elif self.path.exists():
            self.path.unlink()
