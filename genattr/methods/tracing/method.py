"""``method=prada``: label every test image with the RAR / VAR variant that made it, or ``outlier``.

``method.pipeline`` picks one of two pipelines, each a family of the engine run by ``StagedRun``:
``two_stage`` (Zhao et al. provenance, then generator likelihood; :mod:`two_stage`) or ``one_step`` (PRADA;
:mod:`one_step`). Both start with the ``models`` stage (:mod:`models_stage`) and end in the same report
(:mod:`report`). This module only validates the settings and builds the chosen pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from genattr.methods.base import Report, RunContext
from genattr.methods.tracing.one_step import OneStepPipeline
from genattr.methods.tracing.pipeline import TracerPipeline
from genattr.methods.tracing.settings import TracerSettings
from genattr.methods.tracing.two_stage import TwoStagePipeline
from genattr.utils.errors import ConfigError

#: ``method.pipeline`` -> the pipeline it runs
PIPELINES: dict[str, type[TracerPipeline]] = {"two_stage": TwoStagePipeline, "one_step": OneStepPipeline}


class ModelTracer:
    """Two-stage provenance + likelihood tracer, or one-step PRADA; see ``conf/method/prada.yaml``."""

    supports = ("tracing",)

    def __init__(self, *, model: Mapping[str, Any], trainer: Mapping[str, Any], **method: Any) -> None:
        # ``model`` reaches the tracer through ``data.models`` (the task's checkpoints); ``trainer`` through the
        # accelerator. Every other key is ``method.*`` (all of them: the YAML is the one place for defaults).
        self.settings = TracerSettings.from_config(**method)
        self.name = self.settings.name
        self.pipeline = self.settings.pipeline

    def build(self, protocol: Any, ctx: RunContext) -> TracerPipeline:
        """The pipeline of ``method.pipeline`` on ``protocol``, ready to run."""
        if getattr(protocol, "kind", None) != "tracing":
            raise ConfigError(f"method={self.name} needs a 'tracing' protocol (data=rarvar)")
        return PIPELINES[self.pipeline](self.settings, protocol, ctx)

    def run(self, protocol: Any, ctx: RunContext) -> Report:
        return self.build(protocol, ctx).run()
