"""Sweeps through a real SLURM scheduler (slurmctld + slurmd from tests/cluster/slurm-up.sh).

Everything goes through the user's command line (`launch.py -m ... hydra/launcher=slurm_cpu`): real
sbatch array jobs, submitit in the job, the sweep callback on both sides, MLflow in a SQLite file.
Without a reachable cluster every test here is skipped with the reason -- never passed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from genattr.report.__main__ import build_report

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
TINY = ["debug=default", "data.twin.n_train=8", "data.twin.n_val=8", "data.tasks=[gaugan,biggan]"]


def _cluster_reason() -> str | None:
    if shutil.which("sbatch") is None:
        return "no SLURM client (sbatch) on PATH; start the test cluster with tests/cluster/slurm-up.sh"
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20, check=False)
    if "is UP" not in ping.stdout:
        return f"slurmctld not reachable (scontrol ping: {ping.stdout.strip() or ping.stderr.strip()})"
    return None


@pytest.fixture(scope="module")
def cluster() -> None:
    reason = _cluster_reason()
    if reason:
        pytest.skip(reason)


def _sweep(tmp_path: Path, *overrides: str, wait: bool = True, timeout: int = 600):
    """``launch.py -m`` through the test cluster into ``tmp_path/sweep``, tracked in ``tmp_path/mlflow.db``."""
    cmd = [
        sys.executable,
        str(ROOT / "launch.py"),
        "-m",
        "hydra/launcher=slurm_cpu",
        "cluster.partition=debug",
        "tracking=mlflow",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"tracking.artifact_location={tmp_path / 'artifacts'}",
        "tracking.experiment=slurm",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        *overrides,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path, check=False)


def _runs(tmp_path: Path) -> tuple[MlflowClient, list]:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("slurm")
    return client, client.search_runs([exp.experiment_id])


def _split(runs: list) -> tuple[list, list]:
    parents = [r for r in runs if r.data.tags.get("genattr.sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("genattr.sweep") != "parent"]
    return parents, children


def test_two_by_two_sweep_gives_one_parent_and_four_children(cluster, tmp_path):
    proc = _sweep(tmp_path, "method=lorax,replay", "seed=0,1", *TINY)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client, runs = _runs(tmp_path)
    parents, children = _split(runs)
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {c.info.status for c in children} == {"FINISHED"}
    assert {(c.data.tags["method"], c.data.tags["seed"]) for c in children} == {
        ("lorax", "0"),
        ("lorax", "1"),
        ("replay", "0"),
        ("replay", "1"),
    }
    assert all("final/aa" in c.data.metrics and c.data.tags.get("slurm_job_id") for c in children)
    # the summary table on the submitting host names every job with its MLflow run id
    for child in children:
        assert child.info.run_id in proc.stdout
    assert "4/4 jobs completed" in proc.stdout
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "sweep")] == ["sweep/summary.txt"]
    # the ablation report finds the sweep's server and parent run from the sweep dir alone
    report = build_report(str(tmp_path / "sweep")).read_text()
    assert "| lorax | cddb_hard | 2 |" in report and "| replay | cddb_hard | 2 |" in report
    assert "report/report.md" in {a.path for a in client.list_artifacts(parent.info.run_id, "report")}


def test_failed_job_is_failed_in_mlflow_and_in_the_summary(cluster, tmp_path):
    # fp16 on a CPU node fails in the job, before genattr.run has opened an MLflow run
    proc = _sweep(tmp_path, "trainer.mixed_precision=no,fp16", *TINY)
    assert proc.returncode != 0
    assert "1/2 jobs completed" in proc.stdout
    failed_line = next(line for line in proc.stdout.splitlines() if line.startswith("1 ") and "FAILED" in line)
    assert "fp16 needs a CUDA GPU" in failed_line
    client, runs = _runs(tmp_path)
    parents, children = _split(runs)
    assert parents[0].info.status == "FAILED"
    by_status = {c.info.status: c for c in children}
    assert set(by_status) == {"FINISHED", "FAILED"}
    failed = by_status["FAILED"]
    assert failed.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
    assert "fp16 needs a CUDA GPU" in failed.data.tags["error"]
    logs = {Path(a.path).name for a in client.list_artifacts(failed.info.run_id, "logs")}
    assert "FAILED" in logs and any(name.endswith("_log.out") for name in logs)
    assert failed.info.run_id in proc.stdout
    status = json.loads((tmp_path / "sweep" / "1" / "job_status.json").read_text())
    assert status["status"] == "FAILED" and status["run_id"] == failed.info.run_id


def _scontrol_show(job: str) -> str:
    return subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, check=False).stdout


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


def test_requeued_job_resumes_from_its_checkpoint_and_matches_an_uninterrupted_run(cluster, tmp_path):
    # two identical jobs (tags do not shape results); job 0 is preempted after its first task
    tasks = "data.tasks=[gaugan,biggan,crn,cyclegan,imle]"
    proc = _sweep(tmp_path, *TINY[:3], tasks, "data.twin.n_train=24", "tags=[a],[b]", wait=False)
    job0 = tmp_path / "sweep" / "0"
    try:
        _wait(lambda: (job0 / "checkpoints" / "task_000" / "state.json").is_file(), 300, "job 0's first checkpoint")
        status = json.loads((job0 / "job_status.json").read_text())
        slurm_id = f"{status['slurm_job_id']}_{status['slurm_array_task']}"
        # what SLURM does before a preemption / time limit: submitit's signal (USR2) to the job
        t_signal = time.monotonic()
        subprocess.run(["scancel", "--signal=USR2", slurm_id], check=True)
        _wait(lambda: "Restarts=1" in _scontrol_show(slurm_id), 60, "the requeue")
        _wait(lambda: "COMPLETING" not in _scontrol_show(slurm_id), 60, "the old attempt to end")
        time.sleep(2)  # lifting the 120 s requeue hold earlier revokes the new attempt's credential
        subprocess.run(["scontrol", "update", f"JobId={slurm_id}", "StartTime=now"], check=True)
        _wait(lambda: "JobState=RUNNING" in _scontrol_show(slurm_id) or (job0 / "results.json").is_file(), 60, "rerun")
        resume_s = time.monotonic() - t_signal
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    print(f"signal -> requeued job running again: {resume_s:.1f} s")
    info = json.loads((job0 / "run_info.json").read_text())
    assert info["slurm_restart_count"] == 1
    assert info["resumed_from"] and info["resumed_from"].endswith("task_000")
    assert "continuing at task 1" in (job0 / "launch.log").read_text()
    interrupted = json.loads((job0 / "results.json").read_text())
    reference = json.loads((tmp_path / "sweep" / "1" / "results.json").read_text())
    assert interrupted["acc_matrix"] == reference["acc_matrix"]
    assert interrupted["binary_matrix"] == reference["binary_matrix"]
    client, runs = _runs(tmp_path)
    _, children = _split(runs)
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    # the requeued attempt continued the same MLflow run, and the task counter did not restart:
    # every task's evaluation was logged exactly once
    history = client.get_metric_history(info["mlflow_run_id"], "eval/stage_avg_acc")
    assert sorted(m.step for m in history) == [0, 1, 2, 3, 4]
    assert [m.value for m in client.get_metric_history(info["mlflow_run_id"], "resume/from_task")] == [0.0]
    assert "2/2 jobs completed" in out


def test_two_task_job_trains_with_world_size_two_over_gloo(cluster, tmp_path):
    proc = _sweep(tmp_path, "hydra.launcher.tasks_per_node=2", "seed=0", *TINY)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    info = json.loads((tmp_path / "sweep" / "0" / "run_info.json").read_text())
    assert info["world_size"] == "2"
    _, runs = _runs(tmp_path)
    _, children = _split(runs)
    assert len(children) == 1 and children[0].data.tags["world_size"] == "2"
    assert "final/aa" in children[0].data.metrics
