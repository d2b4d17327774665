"""Run ``launch.py`` the way a user runs it on a multi-GPU workstation, here with CPU processes and gloo:
``torchrun --standalone --nproc_per_node N launch.py ...``, and read back what the run left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class LaunchedRun:
    folder: Path
    results: dict[str, Any]
    run_info: dict[str, Any]
    mlflow_runs: list[Any]
    output: str


def launch_command(overrides: list[str], folder: Path, *, nproc: int = 1) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of :func:`launch` (the same command again resumes the run)."""
    db = folder / "mlflow.db"
    args = [
        *overrides,
        f"hydra.run.dir={folder / 'run'}",
        "tracking=mlflow",
        f"tracking.tracking_uri=sqlite:///{db}",
        f"tracking.artifact_location={folder / 'artifacts'}",
        "tracking.experiment=distributed",
    ]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    else:
        cmd = [sys.executable]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GENATTR_FAULT"):
        env.pop(var, None)
    return [*cmd, str(ROOT / "launch.py"), *args], env


def launch(overrides: list[str], folder: Path, *, nproc: int = 1, timeout: int = 900) -> LaunchedRun:
    """``launch.py`` with ``overrides`` into ``folder`` under ``torchrun`` (``nproc`` > 1) or plain python, tracked
    in a SQLite MLflow store of its own; fails with the run's output when it does not exit 0."""
    command, env = launch_command(overrides, folder, nproc=nproc)
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=folder,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    run_dir = folder / "run"
    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["distributed"], output_format="list")
    return LaunchedRun(
        folder=run_dir,
        results=json.loads((run_dir / "results.json").read_text()),
        run_info=json.loads((run_dir / "run_info.json").read_text()),
        mlflow_runs=runs,
        output=output,
    )


def check_one_run_of(run: LaunchedRun, world_size: int) -> None:
    """One results.json, one FINISHED MLflow run, and the process count recorded where a user looks."""
    assert len(run.mlflow_runs) == 1, [r.info.run_id for r in run.mlflow_runs]
    (only,) = run.mlflow_runs
    assert only.info.status == "FINISHED"
    assert only.data.tags["world_size"] == str(world_size) and run.run_info["world_size"] == str(world_size)
