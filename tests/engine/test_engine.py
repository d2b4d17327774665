"""Engine pieces: atomic task checkpoints and the SLURM -> torch.distributed export."""

from __future__ import annotations

import os

import pytest
import torch
from accelerate.state import AcceleratorState

from genattr.engine.accelerator import make_accelerator
from genattr.engine.checkpoint import Checkpointer
from genattr.engine.distributed import MASTER_PORT_RANGE, export_torch_distributed_env, master_port
from genattr.utils.errors import ConfigError


def test_checkpoints_are_committed_by_rename_and_pruned(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=2)
    assert ck.latest() is None
    for t in range(3):
        ck.save(t, lambda folder, t=t: (folder / "w.txt").write_text(str(t)), {"task": t})
    assert [p.name for p in ck.completed()] == ["task_001", "task_002"]
    folder, state = ck.latest()
    assert state["task"] == 2 and (folder / "w.txt").read_text() == "2"

    def crash(folder):
        (folder / "partial").write_text("x")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        ck.save(3, crash, {"task": 3})
    assert ck.latest()[1]["task"] == 2  # the half-written task 3 is invisible


def test_latest_for_refuses_other_settings_or_tasks(tmp_path):
    ck = Checkpointer(tmp_path)
    assert ck.latest_for("abc", ["t0"]) is None
    ck.save(0, lambda folder: None, {"task": 0, "config_fingerprint": "abc", "task_names": ["t0", "t1"]})
    assert ck.latest_for("abc", ("t0", "t1"))[1]["task"] == 0
    assert ck.latest_for("abc")[1]["task"] == 0  # no task sequence to compare
    with pytest.raises(ConfigError, match="other settings"):
        ck.latest_for("xyz")
    with pytest.raises(ConfigError, match=r"is for tasks \['t0', 't1'\], not these"):
        ck.latest_for("abc", ["t0", "t2"])


def _clear_torch_dist_env(monkeypatch) -> None:
    # the export writes os.environ directly: register every key so monkeypatch restores it,
    # otherwise later subprocesses would inherit WORLD_SIZE=2 and wait for a peer forever
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, "unset")
        monkeypatch.delenv(k)


def _as_slurm_task(monkeypatch, job_id: str, rank: int, ntasks: int) -> None:
    """The environment submitit sees in task ``rank`` of a one-node SLURM job with ``ntasks`` tasks."""
    env = {
        "SUBMITIT_EXECUTOR": "slurm",
        "SLURM_JOB_ID": job_id,
        "SLURM_PROCID": str(rank),
        "SLURM_NTASKS": str(ntasks),
        "SLURM_LOCALID": str(rank),
        "SLURM_NODEID": "0",
        "SLURM_JOB_NUM_NODES": "1",
        "SLURM_JOB_NODELIST": "node7",
        "SLURM_STEP_NODELIST": "node7",
        "SLURM_NTASKS_PER_NODE": str(ntasks),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def test_submitit_slurm_env_is_exported_before_accelerate(monkeypatch):
    _clear_torch_dist_env(monkeypatch)
    assert export_torch_distributed_env() == {}  # not in a submitit job: nothing to do
    _as_slurm_task(monkeypatch, "4242", rank=1, ntasks=2)
    out = export_torch_distributed_env()
    assert out["RANK"] == "1" and out["WORLD_SIZE"] == "2" and out["LOCAL_RANK"] == "1"
    assert os.environ["MASTER_ADDR"] == "node7"
    low, high = MASTER_PORT_RANGE
    assert out["MASTER_PORT"] == str(master_port("4242")) and low <= int(out["MASTER_PORT"]) < high
    # another job id gets another port; a port the user set is kept
    assert master_port("4243") != master_port("4242")
    _clear_torch_dist_env(monkeypatch)
    monkeypatch.setenv("MASTER_PORT", "29511")
    assert export_torch_distributed_env()["MASTER_PORT"] == "29511"


def test_single_task_slurm_job_opens_no_process_group(monkeypatch):
    # one task needs no rendezvous; exporting LOCAL_RANK would make Accelerate bind a port
    _clear_torch_dist_env(monkeypatch)
    _as_slurm_task(monkeypatch, "4243", rank=0, ntasks=1)
    assert export_torch_distributed_env() == {}
    assert "LOCAL_RANK" not in os.environ and "MASTER_PORT" not in os.environ
    acc = make_accelerator({"cpu": True, "mixed_precision": "no", "grad_accum": 1, "max_steps": None})
    try:
        assert acc.num_processes == 1 and not torch.distributed.is_initialized()
    finally:
        AcceleratorState._reset_state(True)


def test_one_process_can_run_one_run_after_another_in_other_precisions():
    """Hydra's basic multirun launcher runs jobs in one process: a bf16 job after an fp32 one must not trip over
    Accelerate's process-wide state."""
    trainer = {"cpu": True, "grad_accum": 1, "max_steps": None}
    assert make_accelerator({**trainer, "mixed_precision": "bf16"}).mixed_precision == "bf16"
    assert make_accelerator({**trainer, "mixed_precision": "no"}).mixed_precision == "no"
