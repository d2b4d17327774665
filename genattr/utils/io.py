"""Atomic file writes: a crash mid-write never leaves a half-written checkpoint."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def cache_dir(value: str | Path | None = None) -> Path:
    """The cache folder of twins and twin-pretrained backbones: ``value`` (a run passes ``paths.cache_dir``,
    ``${oc.env:GENATTR_CACHE,<project>/.cache}``) or, for a call outside a run, that same default. One rule for
    every cache, so a twin built from Python and one built by ``launch.py`` land in the same place."""
    if value:
        return Path(str(value)).expanduser()
    env = os.environ.get("GENATTR_CACHE")
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[2] / ".cache"
