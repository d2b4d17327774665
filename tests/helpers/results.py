"""Comparing two runs' results.json: everything but wall-clock times and cache bookkeeping must be equal."""

from __future__ import annotations

import re
from typing import Any

#: keys that hold wall-clock durations (``train_seconds_this_process``, ``time/task_s``, ``stage_seconds``, ...)
TIMING = re.compile(r"(seconds|^time/|_s$|elapsed|images_per_s)")
#: how much work this run did itself rather than read from a cache (AbU's retrains trained here)
BOOKKEEPING = {"retrains_run"}


def comparable(results: Any) -> Any:
    """``results`` without its wall-clock and bookkeeping entries, at any depth."""
    if isinstance(results, dict):
        return {k: comparable(v) for k, v in results.items() if not TIMING.search(str(k)) and str(k) not in BOOKKEEPING}
    if isinstance(results, list):
        return [comparable(v) for v in results]
    return results
