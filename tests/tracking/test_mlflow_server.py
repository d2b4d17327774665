"""Tracking at scale: many jobs writing to one ``mlflow server`` at once lose nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers.mlflow_server import mlflow_server
from mlflow import MlflowClient

from genattr.tracking.mlflow import MLflowTracker

ROOT = Path(__file__).resolve().parents[2]

# one sweep job's worth of tracking traffic: ~200 params, 10 metric steps, tags, an artifact, the end
JOB = textwrap.dedent(
    """
    import sys, time
    from genattr.tracking.mlflow import MLflowTracker
    uri, parent, index, start_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    time.sleep(max(0.0, start_at - time.time()))  # all jobs hit the server at the same moment
    tracker = MLflowTracker(uri, experiment="concurrency", artifact_location="/not/on/this/host")
    params = {"model": {f"p{i}": i for i in range(200)}, "seed": index}
    tracker.start(run_name=f"job{index}", tags={"job": str(index)}, params=params, parent_run_id=parent)
    for step in range(10):
        tracker.log_metrics({"train/loss": 1.0 / (step + 1), "eval/acc": step * index, "lr": 0.1}, step=step)
    tracker.log_dict({"job": index}, "results.json")
    tracker.end("FINISHED")
    """
)


@pytest.mark.slow
def test_eight_concurrent_jobs_against_one_server_lose_no_runs(tmp_path):
    with mlflow_server(tmp_path / "server") as uri:
        parent = MLflowTracker(uri, experiment="concurrency")
        parent.start(run_name="sweep", tags={"genattr.sweep": "parent"}, params={})
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        start_at = time.time() + 8.0  # after every interpreter has imported mlflow
        jobs = [
            subprocess.Popen(
                [sys.executable, "-c", JOB, uri, parent.run_id, str(i), str(start_at)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
            )
            for i in range(8)
        ]
        outputs = [job.communicate(timeout=300)[0] for job in jobs]
        assert [job.returncode for job in jobs] == [0] * 8, "\n".join(o[-1500:] for o in outputs)
        parent.end("FINISHED")

        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("concurrency")
        # the server keeps artifacts itself; a client-side path would only exist on the submitting host
        assert experiment.artifact_location.startswith("mlflow-artifacts:")
        children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.run_id}'")
        assert sorted(int(r.data.tags["job"]) for r in children) == list(range(8))
        for run in children:
            assert run.info.status == "FINISHED"
            assert len(run.data.params) == 201
            for key in ("train/loss", "eval/acc", "lr"):
                assert len(client.get_metric_history(run.info.run_id, key)) == 10, (run.info.run_name, key)
            assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["results.json"]
