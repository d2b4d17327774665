"""MLflow tracker on a throwaway sqlite DB: params, metrics, resume, status, guards."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from genattr.tracking.base import NullTracker, Tracker
from genattr.tracking.mlflow import MLflowTracker, flatten_params
from genattr.utils.errors import ConfigError

CFG = {
    "model": {"name": "convit_base", "lora": {"r": 64, "targets": ["qk", "v"]}},
    "seed": 0,
    "ckpt": None,
    "tags": [],
}


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """One sqlite URI (in a not-yet-existing folder) per module: migrations take seconds."""
    root = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{root}/db/mlflow.db", root / "artifacts"


def make(paths: tuple[str, Path], experiment: str = "test") -> MLflowTracker:
    uri, art = paths
    return MLflowTracker(uri, experiment=experiment, artifact_location=str(art))


def test_flatten(caplog: pytest.LogCaptureFixture) -> None:
    flat = flatten_params({**CFG, "long": "x" * 7000, "k" * 300: 1})
    assert flat["model.name"] == "convit_base"
    assert flat["model.lora.r"] == "64"
    assert flat["model.lora.targets.0"] == "qk" and flat["model.lora.targets.1"] == "v"
    assert flat["ckpt"] == "null"
    assert flat["tags"] == "[]"
    assert len(flat["long"]) == 6000
    assert "k" * 250 in flat
    assert sum("truncated" in r.getMessage() for r in caplog.records) == 2
    assert flatten_params({"a": {"b": 1}}, sep="/") == {"a/b": "1"}


def test_run_lifecycle(paths: tuple[str, Path]) -> None:
    tr = make(paths)
    assert isinstance(tr, Tracker)
    run_id = tr.start(run_name="lorax-easy", tags={"method": "lorax"}, params=CFG)
    assert run_id is not None and tr.run_id == run_id
    assert Path(paths[0].removeprefix("sqlite:///")).exists()
    tr.log_metrics({"eval/acc/task_0": 91.5, "train/loss": torch.tensor(0.25)}, step=0)
    tr.log_metrics({"eval/acc/task_0": np.float32(88.0), "nan": float("nan")}, step=1)
    art = paths[1].parent / "R.txt"  # outside the artifact store
    art.write_text("matrix")
    tr.log_artifact(art, artifact_path="metrics")
    tr.log_dict({"a": 1}, "config/config.yaml")
    assert run_id in tr.describe() and "mlflow ui --backend-store-uri sqlite:///" in tr.describe()
    tr.end()

    client = MlflowClient(tracking_uri=paths[0])
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "lorax-easy"
    assert run.data.tags["method"] == "lorax"
    assert run.data.params["model.lora.r"] == "64"
    assert run.data.params["ckpt"] == "null"
    hist = client.get_metric_history(run_id, "eval/acc/task_0")
    assert sorted((m.step, m.value) for m in hist) == [(0, 91.5), (1, 88.0)]
    assert client.get_metric_history(run_id, "train/loss")[0].value == 0.25
    assert math.isnan(client.get_metric_history(run_id, "nan")[0].value)
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.artifact_location == paths[1].resolve().as_uri()
    assert (paths[1] / run_id / "artifacts" / "metrics" / "R.txt").read_text() == "matrix"
    assert (paths[1] / run_id / "artifacts" / "config" / "config.yaml").exists()


def test_resume_same_run(paths: tuple[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    first = make(paths, experiment="resume")
    run_id = first.start(run_name="r", tags={}, params=CFG)
    first.log_metrics({"m": 1.0}, step=0)
    first.end("KILLED")

    second = make(paths, experiment="resume")
    changed = {**CFG, "seed": 1, "extra": "new"}
    assert second.start(run_name="r", tags={"requeued": "1"}, params=changed, run_id=run_id) == run_id
    second.log_metrics({"m": 2.0}, step=1)
    second.end()

    client = MlflowClient(tracking_uri=paths[0])
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["seed"] == "0"  # immutable, kept
    assert run.data.params["extra"] == "new"  # new keys still logged
    assert run.data.tags["requeued"] == "1"
    assert [m.value for m in client.get_metric_history(run_id, "m")] == [1.0, 2.0]
    assert any("seed" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_a_resumed_run_never_logs_a_step_twice(paths: tuple[str, Path], tmp_path: Path) -> None:
    """An attempt killed after logging steps 0-2 of a stage its rerun redoes from step 1: the steps the run has
    keep their first value; a call the killed attempt left in its spool counts once delivered."""
    first = make(paths, experiment="redo")
    run_id = first.start(run_name="r", tags={}, params=CFG)
    first.log_metrics({"loss": 1.0, "acc": 50.0}, step=0)
    first.log_metrics({"loss": 0.9}, step=1)
    first.log_metrics({"loss": 0.8}, step=2)  # then SIGKILL: no end(), the run stays RUNNING
    spool = tmp_path / "spool.jsonl"  # ... with one call for step 3 still waiting in the spool
    spool.write_text('{"op": "metrics", "metrics": [["loss", 0.7, 1, 3]]}\n')

    second = make(paths, experiment="redo")
    second.attach_spool(spool)
    second.start(run_name="r", tags={}, params=CFG, run_id=run_id)
    for step, loss in ((1, 0.95), (2, 0.85), (3, 0.75), (4, 0.6)):  # the redone stage, then the next one
        second.log_metrics({"loss": loss}, step=step)
    second.log_metrics({"acc": 70.0}, step=4)
    second.log_metrics({"acc": 71.0}, step=4)  # within one attempt nothing is filtered
    second.end()

    client = MlflowClient(tracking_uri=paths[0])
    loss = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
    assert loss == [(0, 1.0), (1, 0.9), (2, 0.8), (3, 0.7), (4, 0.6)]
    assert sorted(m.value for m in client.get_metric_history(run_id, "acc")) == [50.0, 70.0, 71.0]
    assert not spool.exists() and client.get_run(run_id).info.status == "FINISHED"


def test_failed_status_and_parent_tag(paths: tuple[str, Path]) -> None:
    parent = make(paths)
    parent_id = parent.start(run_name="sweep", tags={}, params={})
    child = make(paths)
    child_id = child.start(run_name="job0", tags={}, params={}, parent_run_id=parent_id)
    child.end("FAILED")
    client = MlflowClient(tracking_uri=paths[0])
    run = client.get_run(child_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["mlflow.parentRunId"] == parent_id
    with pytest.raises(ValueError):
        child.end("DONE")


def test_existing_experiment_is_reused(paths: tuple[str, Path]) -> None:
    a, b = make(paths), make(paths)
    assert a.ensure_experiment() == b.ensure_experiment()


@pytest.mark.parametrize(
    "uri",
    ["mlruns", "/abs/mlruns", "file:///abs/mlruns", "./mlruns", "sqlite:///mlflow.db"],
)
def test_cwd_relative_or_file_store_rejected(uri: str) -> None:
    with pytest.raises(ConfigError, match="sqlite:////"):
        MLflowTracker(uri)


def test_disabled_writes_nothing(tmp_path: Path) -> None:
    tr = MLflowTracker(f"sqlite:///{tmp_path}/sub/mlflow.db", enabled=False)
    assert tr.start(run_name="x", tags={}, params=CFG) is None
    tr.log_metrics({"a": 1.0})
    tr.log_dict({"a": 1}, "a.json")
    tr.log_artifact(tmp_path / "missing.txt")
    tr.end("FAILED")
    assert "disabled" in tr.describe()
    assert list(tmp_path.iterdir()) == []


def test_bad_metrics_raise(paths: tuple[str, Path]) -> None:
    tr = make(paths)
    tr.start(run_name="x", tags={}, params={})
    with pytest.raises(TypeError, match="'acc'"):
        tr.log_metrics({"acc": "91.5"})
    with pytest.raises(TypeError, match="'vec'"):
        tr.log_metrics({"vec": np.array([1.0, 2.0])})
    with pytest.raises(TypeError, match="'obj'"):
        tr.log_metrics({"obj": object()})
    tr.end()


def test_logging_before_start_is_an_error(paths: tuple[str, Path]) -> None:
    with pytest.raises(RuntimeError, match="start"):
        make(paths).log_metrics({"a": 1.0})


def test_null_tracker() -> None:
    tr = NullTracker()
    assert isinstance(tr, Tracker)
    assert tr.start(run_name="x", tags={}, params={}) is None
    tr.log_metrics({"a": 1.0}, step=0)
    tr.end("FAILED")
    assert "tracking=none" in tr.describe()


def test_default_artifacts_next_to_db_and_http_hint(tmp_path: Path) -> None:
    tr = MLflowTracker(f"sqlite:///{tmp_path}/logs/mlflow.db")
    assert tr.artifact_location == (tmp_path / "logs" / "artifacts").as_uri()
    assert not (tmp_path / "logs").exists()  # nothing opened before start
    http = MLflowTracker("http://tracking:5000", artifact_location=None)
    assert http.artifact_location is None  # the server decides (proxied artifacts)
    assert "http://tracking:5000/#/experiments/" in http.describe()
