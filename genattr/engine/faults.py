"""Deterministic kill points for the kill/resume tests: ``GENATTR_FAULT`` makes the process SIGKILL itself.

``GENATTR_FAULT=stage:<k>:<n>``
    die at the ``n``-th item (1-based) that a progress loop (:func:`genattr.engine.progress.track`: batches,
    epochs, sweep chunks, score-function fits) hands out during stage ``k`` (0-based) of the staged run;
``GENATTR_FAULT=checkpoint:<k>:<phase>``
    die while the checkpoint of stage ``k`` is written (:meth:`genattr.engine.checkpoint.Checkpointer.save`):
    ``files`` once the family's files and the RNG state are in the temp folder but ``state.json`` is not (a
    partial checkpoint on disk), ``renamed`` right after the rename committed it (before older ones are pruned).

Why in-process and not a ``kill -9`` from the test when a line shows up in the child's output: the child goes on
working while the parent reads and signals, so a stage that takes a second could already be over, and a
checkpoint write (milliseconds) is practically never hit; a point in the code is hit on every machine at the
same item of the same stage. The process still dies of a real SIGKILL (no ``except``/``finally``/``atexit`` runs,
open files stay as they are), which is what a cluster's OOM killer or ``scancel --signal=KILL`` does.

Zero cost when unset: the variable is read once, at import, and :func:`genattr.engine.progress.track` only
wraps its loop when a stage fault is armed. Not for users; the variable is named in the README's kill/resume
matrix.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from genattr.utils.errors import ConfigError

T = TypeVar("T")

#: the environment variable that arms a fault
ENV = "GENATTR_FAULT"
#: the phases of a checkpoint write a fault may name, in the order they happen
CHECKPOINT_PHASES = ("files", "renamed")


def _parse(text: str | None) -> tuple[str, int, str] | None:
    """``(kind, stage, what)`` of ``GENATTR_FAULT``, or None when it is unset or empty."""
    if not text:
        return None
    parts = text.split(":")
    ok = len(parts) == 3 and parts[0] in ("stage", "checkpoint") and parts[1].isdigit()
    if ok and parts[0] == "stage":
        ok = parts[2].isdigit() and int(parts[2]) >= 1
    elif ok:
        ok = parts[2] in CHECKPOINT_PHASES
    if not ok:
        raise ConfigError(
            f"{ENV}={text!r} is not a fault point: use stage:<k>:<n> (n >= 1) or checkpoint:<k>:<phase> with a "
            f"phase in {CHECKPOINT_PHASES}"
        )
    return parts[0], int(parts[1]), parts[2]


ARMED = _parse(os.environ.get(ENV))
_current_stage: int | None = None
_ticks = 0


def kill(where: str) -> None:
    """Say where, then SIGKILL this process (nothing after this line runs)."""
    sys.stderr.write(f"{ENV}: SIGKILL {where}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def enter_stage(k: int | None) -> None:
    """The staged run starts stage ``k`` (None: it left its stage): the progress items count from here."""
    global _current_stage, _ticks
    _current_stage, _ticks = k, 0


def ticking(iterable: Iterable[T]) -> Iterator[T]:
    """``iterable``, counting its items towards an armed ``stage:<k>:<n>`` fault."""
    global _ticks
    for item in iterable:
        if ARMED is not None and ARMED[0] == "stage" and _current_stage == ARMED[1]:
            _ticks += 1
            if _ticks == int(ARMED[2]):
                kill(f"in stage {_current_stage} at progress item {_ticks}")
        yield item


def stage_fault_armed() -> bool:
    """Whether progress loops must count their items."""
    return ARMED is not None and ARMED[0] == "stage"


def at_checkpoint(k: int, phase: str) -> None:
    """The checkpoint of stage ``k`` reached ``phase``; die there when that is the armed fault."""
    if ARMED is not None and ARMED[0] == "checkpoint" and ARMED[1] == k and ARMED[2] == phase:
        kill(f"while writing the checkpoint of stage {k} ({phase})")
