"""Which MLflow runs a report covers: the children of a sweep's parent run, or a whole experiment.

A sweep dir is resolved through ``<sweep>/.genattr/parent.json`` (written by the sweep callback), so
the report finds the right server and parent run without the user typing either.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Run

from genattr.config import PROJECT_ROOT
from genattr.tracking import sweep
from genattr.tracking.mlflow import check_tracking_uri
from genattr.utils.errors import ConfigError


@dataclass
class Selection:
    """The runs of one report and where they came from."""

    client: MlflowClient
    tracking_uri: str
    runs: list[Run]
    label: str
    parent_run_id: str | None = None
    sweep_dir: Path | None = None


def project_root() -> Path:
    """``paths.root_dir`` outside Hydra: ``GENATTR_ROOT``, else the checkout (``conf/paths/default.yaml``)."""
    return Path(os.environ.get("GENATTR_ROOT", PROJECT_ROOT))


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else the project's local store (what ``conf/tracking/mlflow.yaml`` uses)."""
    return os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{project_root() / 'mlflow.db'}")


def _search(client: MlflowClient, experiment_ids: list[str], query: str) -> list[Run]:
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(experiment_ids, query, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def select(target: str, tracking_uri: str | None = None) -> Selection:
    """Runs of ``target``: a sweep dir (its children) or an experiment name (all but sweep parents)."""
    path = Path(target).expanduser()
    if path.is_dir():
        parent = sweep.read_parent(path)
        if parent is None:
            raise ConfigError(
                f"{path} is not a genattr sweep dir (no {sweep.STATE_DIR}/{sweep.PARENT_FILE}); pass the folder that "
                "`launch.py -m` printed as the sweep output dir, or an experiment name"
            )
        if not parent.get("parent_run_id"):
            raise ConfigError(f"the sweep in {path} ran with tracking=none; there are no MLflow runs to report")
        uri = check_tracking_uri(tracking_uri or parent["tracking_uri"])
        client = MlflowClient(uri)
        query = f"tags.mlflow.parentRunId = '{parent['parent_run_id']}'"
        runs = _search(client, [str(parent["experiment_id"])], query)
        return Selection(client, uri, runs, path.name, parent["parent_run_id"], path)
    uri = check_tracking_uri(tracking_uri or default_tracking_uri())
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(target)
    if experiment is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ConfigError(f"{target!r} is neither a folder nor an MLflow experiment at {uri} (experiments: {names})")
    runs = [r for r in _search(client, [experiment.experiment_id], "") if r.data.tags.get("genattr.sweep") != "parent"]
    return Selection(client, uri, runs, target)
