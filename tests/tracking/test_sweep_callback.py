"""The sweep callback's guards and bookkeeping, driven directly (no scheduler needed)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from genattr.tracking import sweep
from genattr.tracking.callbacks import SweepTracking


def _config(root: Path, sweep_dir: Path, launcher: str):
    return OmegaConf.create(
        {
            "paths": {"root_dir": str(root)},
            "tracking": {"_target_": "genattr.tracking.base.NullTracker"},
            "hydra": {
                "sweep": {"dir": str(sweep_dir)},
                "launcher": {"_target_": launcher},
                "overrides": {"task": ["seed=0,1"]},
                "job": {"name": "launch"},
            },
        }
    )


@pytest.fixture
def dirty_repo(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    run = lambda *a: subprocess.run(["git", *a], cwd=repo, check=True, capture_output=True)  # noqa: E731
    run("init", "-q")
    (repo / "code.py").write_text("x = 1\n")
    run("add", "code.py")
    run("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init")
    (repo / "code.py").write_text("x = 2\n")  # uncommitted edit
    return repo


SLURM = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
LOCAL = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"


def test_strict_git_refuses_a_dirty_tree_for_slurm_sweeps(dirty_repo, tmp_path):
    with pytest.raises(SystemExit):
        SweepTracking(strict_git=True).on_multirun_start(_config(dirty_repo, tmp_path / "s1", SLURM))
    assert sweep.read_parent(tmp_path / "s1") is None


def test_dirty_tree_warns_records_and_goes_on(dirty_repo, tmp_path, caplog):
    callback = SweepTracking(strict_git=False)
    callback.on_multirun_start(_config(dirty_repo, tmp_path / "s2", SLURM))
    assert "uncommitted changes" in caplog.text
    record = sweep.read_parent(tmp_path / "s2")
    assert record["git_dirty"] == "true" and len(record["git_sha"]) == 40 and "parent_run_id" not in record
    callback._finish()  # no jobs: an empty table, no crash with tracking=none
    assert (tmp_path / "s2" / sweep.STATE_DIR / "summary.txt").is_file()


def test_local_sweeps_are_not_refused(dirty_repo, tmp_path, caplog):
    SweepTracking(strict_git=True).on_multirun_start(_config(dirty_repo, tmp_path / "s3", LOCAL))
    assert "uncommitted" not in caplog.text


def test_summary_table_shows_only_the_overrides_that_differ():
    rows = [
        {"job": "0", "status": "COMPLETED", "run_id": "abc", "overrides": ["data=x", "seed=0"]},
        {"job": "1", "status": "FAILED", "run_id": None, "overrides": ["data=x", "seed=1"], "error": "boom"},
    ]
    table = sweep.format_table(rows).splitlines()
    assert table[0].split() == ["job", "status", "run", "id", "restarts", "overrides", "error"]
    assert table[2].split() == ["0", "COMPLETED", "abc", "0", "seed=0", "-"]
    assert table[3].split() == ["1", "FAILED", "-", "0", "seed=1", "boom"]
