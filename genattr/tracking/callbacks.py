"""Hydra callbacks for tracking.

``PrepareTracking.on_multirun_start`` runs once on the submitting host before any job
starts: it creates the MLflow database (schema migration) and the experiment, so that
parallel jobs never race to migrate a fresh SQLite file.
"""

from __future__ import annotations

import logging
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class PrepareTracking(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from genattr.config import register_resolvers
        from genattr.utils.instantiate import build

        register_resolvers()
        node = config.get("tracking")
        if node is None or "_target_" not in node or not str(node._target_).endswith("MLflowTracker"):
            return
        tracker = build(node)
        experiment_id = tracker.ensure_experiment()
        log.info("MLflow ready for the sweep: %s (experiment id %s)", tracker.tracking_uri, experiment_id)
