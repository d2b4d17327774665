"""What both model-tracer pipelines share as a family of the engine (:class:`~genattr.engine.stages.StagedFamily`).

A pipeline is a list of named stages, the first of which (``models``) is common; the engine restores the newest
stage checkpoint (identity: the pipeline), saves one after every stage (:class:`TracerState` + the RNG state and
MLflow run id) and stops after ``stop_after_task``. Subclasses add their stages, their predictions, their
diagnostics and what their score histograms show.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from genattr.data.rarvar import TracingProtocol
from genattr.engine.stages import StagedRun
from genattr.engine.training import per_process
from genattr.methods.base import Report, RunContext
from genattr.methods.tracing.assets import TaskAssets
from genattr.methods.tracing.models_stage import train_models
from genattr.methods.tracing.report import tracer_report
from genattr.methods.tracing.settings import TracerSettings
from genattr.methods.tracing.state import TracerState

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


class TracerPipeline:
    """The shared part of ``pipeline=two_stage`` and ``pipeline=one_step``."""

    stage_kind = "stage"

    def __init__(self, settings: TracerSettings, protocol: TracingProtocol, ctx: RunContext) -> None:
        self.settings = settings
        self.protocol = protocol
        self.ctx = ctx
        self.acc = ctx.accelerator
        self.assets = TaskAssets(protocol, self.acc.device)
        self.state = TracerState.fresh(protocol)
        self.resumed: list[str] = []
        #: what this process computed in this session (results.json ``per_process``: the work was shared)
        self.counts: Counter[str] = Counter()

    # -- what a subclass writes ------------------------------------------------------------------
    def stages(self) -> Sequence[tuple[str, Callable[[], Mapping[str, float]]]]:
        """(name, run) of every stage in order; each run returns the stage's metrics."""
        return (("models", self.models),)

    def predict(self) -> dict[str, list[str]]:
        """The label of every image of every split."""
        raise NotImplementedError

    def diagnostics(self) -> dict[str, Any]:
        """Separations the spec's twin properties name (results.json ``diagnostics``)."""
        raise NotImplementedError

    def histogram(self, split: str, family_index: int) -> tuple[np.ndarray, str]:
        """The per-image score shown in ``scores_<family>_<split>.png``, and its axis label."""
        raise NotImplementedError

    # -- the shared stage --------------------------------------------------------------------------
    def models(self) -> dict[str, float]:
        return train_models(self.settings, self.assets, self.state, self.ctx, self.counts)

    # -- the engine's protocol -----------------------------------------------------------------------
    def stage_names(self) -> list[str]:
        return [name for name, _ in self.stages()]

    def identity(self) -> dict[str, Any]:
        return {"pipeline": self.settings.pipeline}

    def run_stage(self, k: int) -> Mapping[str, float]:
        name, run = self.stages()[k]
        t0 = time.perf_counter()
        metrics = run()
        self.state.meta["timings"][name] = time.perf_counter() - t0
        return metrics

    def checkpoint(self, k: int) -> tuple[Callable[[Path], None], dict[str, Any]]:
        return self.state.write, {}

    def restore(self, folder: Path, state: Mapping[str, Any]) -> None:
        self.state = TracerState.load(folder)
        self.resumed = self.stage_names()[: int(state["task"]) + 1]

    def report(self, *, completed: bool, last: int) -> Report:
        if not completed:
            name = self.stage_names()[last]
            return Report({}, {"stopped_after": name}, [], f"stopped after stage {name}", completed=False)
        return tracer_report(self)

    def per_process(self) -> dict[str, list[int]]:
        """Every count of :attr:`counts`, one entry per process in rank order."""
        every: list[Counter[str]] = per_process(self.acc, self.counts)
        return {k: [int(c[k]) for c in every] for k in sorted({k for c in every for k in c})}

    def log_flags(self) -> None:
        flags = self.settings.flags()
        log.warning("model tracer quirk flags: %s", json.dumps(flags, default=str))
        if self.acc.is_main_process:
            self.ctx.tracker.log_dict(flags, "config/prada_flags.json")

    def run(self) -> Report:
        self.log_flags()
        title = f"{self.settings.name} ({self.settings.pipeline}) on {self.protocol.name} ({self.protocol.source})"
        return StagedRun(self, self.ctx, title=title).run()

    # -- helpers both pipelines read -------------------------------------------------------------------
    def labelled_splits(self) -> list[str]:
        return [s for s in ("val", "test") if self.protocol.split(s).labels]
