"""The command line as a user runs it: clear one-sentence errors, and a parallel multirun through
submitit_local that yields one MLflow run and one results.json per job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["debug=default", "data.twin.n_train=8", "data.twin.n_val=8", "data.tasks=[gaugan,biggan]"]


def _launch(*args: str, tmp_path: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), *args, f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=tmp_path,
    )


def test_missing_data_root_is_one_clear_sentence(tmp_path):
    proc = _launch(*TINY, f"data.root={tmp_path / 'nope'}", "model.pretrained=false", "trainer=cpu", tmp_path=tmp_path)
    assert proc.returncode == 1
    err = proc.stdout + proc.stderr
    assert f"data.root={tmp_path / 'nope'} does not exist" in err
    assert "Traceback" not in err


def test_a_plus_typo_is_a_clear_error_before_anything_runs(tmp_path):
    proc = _launch(*TINY, "+method.memory.sise=10", tmp_path=tmp_path, timeout=120)
    assert proc.returncode == 1
    err = proc.stdout + proc.stderr
    assert "+method.memory.sise=10: method.memory has no key 'sise' (did you mean method.memory.size?)" in err
    assert "Traceback" not in err and not (tmp_path / "run" / "results.json").exists()


def test_fp16_on_cpu_is_a_clear_error(tmp_path):
    proc = _launch(*TINY, "trainer.mixed_precision=fp16", tmp_path=tmp_path)
    assert proc.returncode == 1
    assert "trainer.mixed_precision=fp16 needs a CUDA GPU" in proc.stdout + proc.stderr


def test_offline_pretrained_without_weights_fails_fast(tmp_path):
    proc = _launch(
        *TINY,
        "model=convit_small",
        "profile=paper",
        "trainer=cpu",
        "data.crop=32",
        tmp_path=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "HF_HUB_OFFLINE=1" in proc.stdout + proc.stderr and "model.weights=" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_submitit_local_multirun_gives_one_mlflow_run_and_results_per_job(tmp_path):
    db = tmp_path / "mlflow.db"
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch.py"),
            "-m",
            "method=lorax,replay",
            "seed=0,1",
            *TINY,
            "hydra/launcher=local",
            f"hydra.sweep.dir={sweep}",
            "tracking=mlflow",
            f"tracking.tracking_uri=sqlite:///{db}",
            f"tracking.artifact_location={tmp_path / 'art'}",
            "tracking.experiment=sweep",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
        env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted(sweep.glob("*/results.json"))
    assert len(results) == 4
    combos = {(json.loads(p.read_text())["method"], json.loads(p.read_text())["seed"]) for p in results}
    assert combos == {("lorax", 0), ("lorax", 1), ("replay", 0), ("replay", 1)}
    assert len(list((sweep / ".submitit").glob("*"))) >= 4  # submitit job folders with logs
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    every = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    parents = [r for r in every if r.data.tags.get("genattr.sweep") == "parent"]
    runs = [r for r in every if r not in parents]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parents[0].info.run_id}
    assert "4/4 jobs completed" in proc.stdout
    assert {(r.data.tags["method"], r.data.tags["seed"]) for r in runs} == {
        ("lorax", "0"),
        ("lorax", "1"),
        ("replay", "0"),
        ("replay", "1"),
    }
