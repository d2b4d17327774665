"""An MLflow outage never kills a run and never loses a metric: calls wait in a spool and are replayed.

The server is a real ``mlflow server`` (tests/helpers/mlflow_server.py) that the tests stop and start again on the same
port and database, the way a tracking server restarts under a running sweep.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers.mlflow_server import free_port, mlflow_server
from mlflow import MlflowClient

from genattr.tracking.mlflow import MLflowTracker
from genattr.tracking.replay import replay
from genattr.tracking.spool import SPOOL_FILE, Spool, is_transient

ROOT = Path(__file__).resolve().parents[2]


def test_transient_errors_are_told_apart_from_bad_requests():
    from mlflow.exceptions import MlflowException

    assert is_transient(MlflowException("API request to http://x failed: Max retries exceeded (Connection refused)"))
    assert is_transient(ConnectionRefusedError()) and is_transient(MlflowException("database is locked"))
    assert not is_transient(MlflowException("INVALID_PARAMETER_VALUE: metric name too long"))
    assert not is_transient(ValueError("bad"))


def test_the_spool_keeps_calls_in_order_across_processes(tmp_path):
    spool = Spool(tmp_path / SPOOL_FILE)
    for i in range(3):
        spool.append({"op": "metrics", "metrics": [["m", float(i), 0, i]]})
    again = Spool(tmp_path / SPOOL_FILE)  # a resumed process reads what the killed one left
    assert [op["metrics"][0][3] for op in again.ops] == [0, 1, 2]
    again.drop_first(2)
    assert [op["metrics"][0][3] for op in Spool(tmp_path / SPOOL_FILE).ops] == [2]
    again.drop_first(1)
    assert not (tmp_path / SPOOL_FILE).exists()


@pytest.mark.slow
def test_a_run_started_while_the_server_is_down_is_delivered_whole_when_it_comes_back(tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    tracker = MLflowTracker(uri, experiment="outage", retries=0, backoff_s=0.05, outage_patience_s=0)
    tracker.attach_spool(tmp_path / "run" / SPOOL_FILE)
    assert tracker.start(run_name="r", tags={"method": "toy"}, params={"a": {"b": 1}}) is None  # no traceback
    for step in range(3):
        tracker.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    (tmp_path / "run" / "results.json").write_text("{}")
    tracker.log_artifact(tmp_path / "run" / "results.json")
    tracker.log_dict({"x": 1}, "config/info.json")
    tracker.end("FINISHED")  # patience 0: the calls stay in the spool
    assert [op["op"] for op in Spool(tmp_path / "run" / SPOOL_FILE).ops] == [
        "start",
        "metrics",
        "metrics",
        "metrics",
        "artifact",
        "dict",
        "end",
    ]
    (tmp_path / "run" / "run_info.json").write_text(
        json.dumps({"tracking_uri": uri, "experiment": "outage", "mlflow_run_id": None})
    )
    with mlflow_server(tmp_path / "server", port=port):
        assert replay(tmp_path / "run", patience_s=30) == 0
        run_id = json.loads((tmp_path / "run" / "run_info.json").read_text())["mlflow_run_id"]
        client = MlflowClient(uri)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.params["a.b"] == "1" and run.data.tags["method"] == "toy"
        assert [m.step for m in client.get_metric_history(run_id, "loss")] == [0, 1, 2]
        assert {a.path for a in client.list_artifacts(run_id)} == {"results.json", "config"}
    assert not (tmp_path / "run" / SPOOL_FILE).exists()


def _follow(proc: subprocess.Popen, lines: list[str]) -> threading.Thread:
    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    return t


@pytest.mark.slow
def test_a_server_outage_in_the_middle_of_a_run_loses_nothing(tmp_path):
    """The server goes away for 30 s after the first task and comes back: the run trains on, and ends FINISHED
    with every task's metrics (once each) and its artifacts in MLflow, and a warning saying what happened."""
    port, server_dir = free_port(), tmp_path / "server"
    uri = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable,
        str(ROOT / "launch.py"),
        "data.tasks=[gaugan,biggan,wild]",
        "data.twin.n_train=32",
        "data.twin.n_val=16",
        "trainer.epochs=2",
        f"hydra.run.dir={tmp_path / 'run'}",
        "tracking=mlflow",
        f"tracking.tracking_uri={uri}",
        "tracking.experiment=outage",
        "tracking.retries=0",
        "tracking.backoff_s=0.2",
        "tracking.outage_patience_s=120",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", GENATTR_PROGRESS_SECONDS="1000")
    lines: list[str] = []
    with mlflow_server(server_dir, port=port):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        reader = _follow(proc, lines)
        deadline = time.monotonic() + 600
        while not any("task 1/3 (gaugan) done" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)[-4000:]
            time.sleep(0.2)
    down_at = time.monotonic()  # the server is stopped here, mid-run
    while time.monotonic() - down_at < 30:
        assert proc.poll() is None or proc.returncode == 0, "".join(lines)[-4000:]
        time.sleep(0.5)
    with mlflow_server(server_dir, port=port):
        assert proc.wait(timeout=600) == 0, "".join(lines)[-4000:]
        reader.join(timeout=10)
        out = "".join(lines)
        assert "is unreachable" in out and "answers again" in out
        run_id = json.loads((tmp_path / "run" / "run_info.json").read_text())["mlflow_run_id"]
        client = MlflowClient(uri)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(run_id, "eval/stage_avg_acc")]
        assert steps == [0, 1, 2]  # every task, none twice
        assert "final/aaf" in run.data.metrics
        assert {"results.json", "config", "plots"} <= {a.path for a in client.list_artifacts(run_id)}
    assert not (tmp_path / "run" / SPOOL_FILE).exists()
