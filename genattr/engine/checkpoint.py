"""Task-boundary checkpoints, written atomically.

A checkpoint is a folder ``checkpoints/task_<k>/`` with the model files, the RNG state
and ``state.json`` (accuracy matrix so far, exemplar memory, MLflow run id). It is
written into a temp folder and renamed into place: the rename is the commit, so a
folder named ``task_<k>`` is always complete and the newest one is what ``resume``
continues from.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from genattr.engine import faults
from genattr.utils.errors import ConfigError
from genattr.utils.io import atomic_write_json

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, folder: str | Path, *, keep_last: int = 2) -> None:
        self.folder = Path(folder)
        self.keep_last = max(1, int(keep_last))

    def path(self, task: int) -> Path:
        return self.folder / f"task_{task:03d}"

    def save(self, task: int, write: Callable[[Path], None], state: dict[str, Any]) -> Path:
        """Write a checkpoint for ``task``: ``write(tmp_folder)`` adds the files, we add state.json."""
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.path(task)
        tmp = self.folder / f".{final.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write(tmp)
        faults.at_checkpoint(task, "files")  # the kill/resume tests' partial checkpoint
        atomic_write_json(tmp / "state.json", state)
        if final.exists():  # a complete checkpoint from an earlier attempt at this task
            trash = self.folder / f".{final.name}.old"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        faults.at_checkpoint(task, "renamed")
        for old in self.completed()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint written: %s", final)
        return final

    def completed(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        found = [p for p in self.folder.glob("task_*") if (p / "state.json").is_file()]
        return sorted(found, key=lambda p: int(p.name.split("_")[1]))

    def latest(self) -> tuple[Path, dict[str, Any]] | None:
        done = self.completed()
        if not done:
            return None
        with open(done[-1] / "state.json") as fh:
            return done[-1], json.load(fh)

    def latest_for(
        self, fingerprint: str, task_names: Sequence[str] | None = None
    ) -> tuple[Path, dict[str, Any]] | None:
        """:meth:`latest`, refused with a sentence when it was written with other result-shaping settings or,
        when ``task_names`` is given, for another task sequence (a protocol whose data changed under the same
        overrides)."""
        found = self.latest()
        if found is not None and found[1].get("config_fingerprint") != fingerprint:
            raise ConfigError(
                f"the checkpoint {found[0]} was written with other settings; continue it with the same "
                "overrides, or start fresh with resume=never (or another hydra.run.dir)."
            )
        if found is not None and task_names is not None and found[1].get("task_names") != list(task_names):
            raise ConfigError(f"the checkpoint {found[0]} is for tasks {found[1].get('task_names')}, not these.")
        return found
