"""Write-once cache folders for twins: keyed by a hash of their parameters, committed by a rename.

A twin is generated into a temporary sibling folder and renamed into place once its
manifest is written, so a crash or a concurrent run never leaves a half-written twin
behind the cache key, and two processes racing for the same twin both end up reading
the winner's folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from genattr.utils.errors import DataError

log = logging.getLogger(__name__)

MANIFEST = "twin.json"


def cached_twin(
    cache_dir: str | Path, kind: str, params: Mapping[str, Any], generate: Callable[[Path], Mapping[str, Any]]
) -> Path:
    """Return ``<cache_dir>/<kind>/<hash of params>``, calling ``generate(tmp)`` once if missing.

    ``generate`` fills the folder and returns extra manifest entries; ``params`` must be
    JSON-serialisable and include a generator version, bumped whenever the bytes change.
    """
    digest = hashlib.sha256(json.dumps(dict(params), sort_keys=True, default=str).encode()).hexdigest()[:12]
    base = Path(cache_dir).expanduser() / kind
    final = base / digest
    if (final / MANIFEST).is_file():
        return final
    if final.exists():
        raise DataError(
            f"{final} exists but has no {MANIFEST}, so it is not a finished twin; delete it and run again to regenerate"
        )
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest}.tmp-", dir=base))
    start = time.perf_counter()
    try:
        extra = generate(tmp)
        (tmp / MANIFEST).write_text(json.dumps({"params": dict(params), **extra}, indent=1, sort_keys=True))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MANIFEST).is_file():  # not a concurrent winner: a real failure
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("generated %s %s in %.1fs", kind, final, time.perf_counter() - start)
    return final
