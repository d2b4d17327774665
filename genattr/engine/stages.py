"""The staged-run loop every method family runs through: tasks, windows, pipeline stages, queries, retrains.

A family says what its stages are and what one stage does (:class:`StagedFamily`); :class:`StagedRun` does the
rest once for all of them, the way Avalanche runs a stream of experiences:

* restore: the newest checkpoint written with the same result-shaping settings *and* the same stage identity
  (task names, windows, pipeline) is loaded into the family, then the RNG state saved with it, and the run
  continues at the next stage; a checkpoint from other settings is refused with a sentence;
* run: each remaining stage under a header line, its metrics logged to the tracker at the stage's index, its
  wall time as ``time/<kind>_s`` (a stage redone after a kill logs nothing twice: the tracker of a resumed run
  skips the steps it already has);
* save: after every stage, atomically (``Checkpointer``: temp folder + rename), with the RNG state, the MLflow
  run id (a requeued job continues the same run) and the settings' fingerprint;
* stop: after ``stop_after_task`` (a stage index), with an incomplete report; nothing is lost.

Only the main process writes; every process restores from the same folder. ``GENATTR_FAULT``
(:mod:`genattr.engine.faults`) kills the process at a named stage item or checkpoint phase, for the kill/resume
tests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from safetensors.torch import load_file, save_file

from genattr.engine import faults
from genattr.engine.progress import duration
from genattr.utils.errors import ConfigError
from genattr.utils.seed import rng_state, set_rng_state

if TYPE_CHECKING:  # the contract lives with the methods; the engine only drives it
    from genattr.methods.base import Report, RunContext

log = logging.getLogger(__name__)

#: the file beside ``state.json`` that holds the tensor part of the RNG state
RNG_FILE = "rng.safetensors"


class StagedFamily(Protocol):
    """What a method family writes for the engine; see the module docstring for what the engine does."""

    #: what one stage is called in logs and metric names: "task", "window", "stage", ...
    stage_kind: str

    def stage_names(self) -> Sequence[str]:
        """The run's stages in order. Read again after every stage, so a family may append stages it only
        knows once earlier ones ran (AbU's leave-K-out retrains follow from its query scores)."""
        ...

    def identity(self) -> Mapping[str, Any]:
        """What besides the settings makes a checkpoint this run's (JSON); another identity is refused."""
        ...

    def run_stage(self, k: int) -> Mapping[str, float]:
        """Run stage ``k``; return its metrics, logged at step ``k``."""
        ...

    def checkpoint(self, k: int) -> tuple[Callable[[Path], None], dict[str, Any]]:
        """After stage ``k``: a writer that puts the family's files into a checkpoint folder, and the JSON state
        (it must not use the engine's keys: task, stage, kind, identity, rng, mlflow_run_id, config_fingerprint)."""
        ...

    def restore(self, folder: Path, state: Mapping[str, Any]) -> None:
        """Load what :meth:`checkpoint` wrote after the stage ``state["task"]``."""
        ...

    def report(self, *, completed: bool, last: int) -> Report:
        """The run's report after stage ``last`` (-1: none ran); ``completed`` is false after a stop."""
        ...


ENGINE_KEYS = ("task", "stage", "kind", "identity", "rng", "mlflow_run_id", "config_fingerprint")


class StagedRun:
    """Drive one family through its stages (see the module docstring)."""

    def __init__(self, family: StagedFamily, ctx: RunContext, *, title: str) -> None:
        self.family = family
        self.ctx = ctx
        self.title = title
        self.acc = ctx.accelerator
        self.kind = family.stage_kind
        self.seconds: dict[str, float] = {}

    # -- restore / save ----------------------------------------------------------------------------
    def restore(self) -> int:
        """Load the newest usable checkpoint into the family; return the first stage still to run.

        The main process chooses the checkpoint and every process loads that one, then all wait for each other:
        a process that looked on its own could find the checkpoint the main process writes after a quick first
        stage, skip that stage and pair its collectives with the wrong ones (a hang under ``torchrun``)."""
        found = self.ctx.checkpoints.latest_for(self.ctx.config_fingerprint) if self.acc.is_main_process else None
        if self.acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            found = broadcast_object_list([found], from_process=0)[0]
        try:
            return self._load(found)
        finally:
            self.acc.wait_for_everyone()

    def _load(self, found: tuple[Path, Mapping[str, Any]] | None) -> int:
        if found is None:
            return 0
        folder, state = found
        identity = _jsonable(self.family.identity())
        if state.get("identity") != identity:
            raise ConfigError(
                f"the checkpoint {folder} is for {state.get('identity')}, not {identity}; continue it with the "
                "same data, or start fresh with resume=never (or another hydra.run.dir)."
            )
        self.family.restore(folder, state)
        set_rng_state(state["rng"], load_file(str(folder / RNG_FILE)))
        last = int(state["task"])
        log.warning("resumed from %s: %s %d (%s) is done", folder, self.kind, last, state.get("stage"))
        self.ctx.tracker.log_metrics({f"resume/from_{self.kind}": float(last)}, step=last)
        return last + 1

    def save(self, k: int, name: str) -> None:
        write, family_state = self.family.checkpoint(k)
        clash = set(family_state) & set(ENGINE_KEYS)
        if clash:
            raise RuntimeError(f"a family's checkpoint state uses the engine's keys {sorted(clash)}")
        meta, tensors = rng_state()

        def write_all(folder: Path) -> None:
            write(folder)
            save_file(tensors, str(folder / RNG_FILE))

        state = {
            **family_state,
            "task": k,
            "stage": name,
            "kind": self.kind,
            "identity": _jsonable(self.family.identity()),
            "rng": meta,
            "mlflow_run_id": getattr(self.ctx.tracker, "run_id", None),
            "config_fingerprint": self.ctx.config_fingerprint,
        }
        if self.acc.is_main_process:
            self.ctx.checkpoints.save(k, write_all, state)
        self.acc.wait_for_everyone()

    # -- the loop ----------------------------------------------------------------------------------
    def run(self) -> Report:
        start = self.restore()
        names = list(self.family.stage_names())
        head = f"{self.title}: {len(names)} {self.kind}(s) [{', '.join(map(str, names))}]"
        if start:
            head += f"; continuing at {self.kind} {start}"
        log.info("%s", head)
        stop = self.ctx.stop_after_task
        k, t_run = start, time.perf_counter()
        while k < len(names):
            name = str(names[k])
            log.info("%s %d/%d (%s) starts", self.kind, k + 1, len(names), name)
            t0 = time.perf_counter()
            faults.enter_stage(k)
            metrics = dict(self.family.run_stage(k))
            faults.enter_stage(None)
            seconds = time.perf_counter() - t0
            self.seconds[name] = seconds
            self.ctx.tracker.log_metrics({**metrics, f"time/{self.kind}_s": seconds}, step=k)
            self.save(k, name)
            names = list(self.family.stage_names())
            left = (time.perf_counter() - t_run) / (k + 1 - start) * (len(names) - k - 1)
            log.info(
                "%s %d/%d (%s) done in %s%s",
                self.kind,
                k + 1,
                len(names),
                name,
                duration(seconds),
                f", about {duration(left)} left" if k + 1 < len(names) else "",
            )
            if stop is not None and k >= int(stop) and k < len(names) - 1:
                log.warning("stop_after_task=%s: stopping after the checkpoint of %s %d", stop, self.kind, k)
                return self.family.report(completed=False, last=k)
            k += 1
        return self.family.report(completed=True, last=k - 1)


def _jsonable(obj: Any) -> Any:
    """Tuples as lists, so an identity compares equal to what JSON gave back."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj
