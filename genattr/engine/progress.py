"""Progress everyone can read: a bar with rate and ETA on a terminal, plain periodic log lines in a file.

A SLURM job's output is a file, where tqdm's carriage returns turn into one unreadable line per update; there
:func:`track` writes an ordinary log line every ``GENATTR_PROGRESS_SECONDS`` seconds (30 by default) instead,
with the same count, rate and ETA. Only the main process reports; the others iterate silently.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

from genattr.engine import faults

log = logging.getLogger("genattr.progress")
T = TypeVar("T")

#: seconds between two plain progress lines when the output is not a terminal
PLAIN_EVERY_S = float(os.environ.get("GENATTR_PROGRESS_SECONDS", "30"))


def interactive() -> bool:
    """A terminal is watching (tqdm's bar is readable there); otherwise the output is a file or a pipe."""
    return sys.stderr.isatty()


def track(
    iterable: Iterable[T],
    *,
    desc: str,
    total: int | None = None,
    unit: str = "it",
    main_process: bool = True,
    every_s: float | None = None,
) -> Iterator[T]:
    """Iterate ``iterable`` and report progress (see the module docstring)."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if faults.stage_fault_armed():  # the kill/resume tests' ``GENATTR_FAULT=stage:<k>:<n>``
        iterable = faults.ticking(iterable)
    if not main_process:
        yield from iterable
        return
    if interactive():
        yield from tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True)
        return
    yield from _plain(iterable, desc, total, unit, PLAIN_EVERY_S if every_s is None else every_s)


def _plain(iterable: Iterable[T], desc: str, total: int | None, unit: str, every_s: float) -> Iterator[T]:
    start = last = time.perf_counter()
    done = 0
    for item in iterable:
        yield item
        done += 1
        now = time.perf_counter()
        if now - last >= every_s:
            last = now
            log.info("%s", progress_line(desc, done, total, now - start, unit))
    if done:
        log.info("%s", progress_line(desc, done, total, time.perf_counter() - start, unit))


def progress_line(desc: str, done: int, total: int | None, seconds: float, unit: str = "it") -> str:
    """``desc: 120/480 it (25%), 3.10 it/s, 1m56s left`` (no total: count and rate only)."""
    rate = done / seconds if seconds > 0 else float("inf")
    head = f"{desc}: {done}/{total} {unit} ({100 * done / total:.0f}%)" if total else f"{desc}: {done} {unit}"
    line = f"{head}, {rate:.2f} {unit}/s"
    if total and rate not in (0.0, float("inf")):
        line += f", {duration((total - done) / rate)} left"
    return line


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"
