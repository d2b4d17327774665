"""``make rerun RUN=<dir>``: a cut-short run continues in its own dir from its checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest

from genattr.rerun import main as rerun_main
from genattr.rerun import replay_command

ROOT = Path(__file__).resolve().parents[2]
TINY = ["debug=default", "data.twin.n_train=8", "data.twin.n_val=8", "data.tasks=[gaugan,biggan]"]


@pytest.mark.slow
def test_rerun_continues_a_stopped_run_in_the_same_dir(tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    run = partial(subprocess.run, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600, check=False)
    first = run([sys.executable, str(ROOT / "launch.py"), *TINY, "stop_after_task=0", f"hydra.run.dir={run_dir}"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads((run_dir / "results.json").read_text())["completed"] is False
    assert "stop_after_task=0" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    again = run([sys.executable, "-m", "genattr.rerun", str(run_dir), "stop_after_task=null"])
    assert again.returncode == 0, again.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["completed"] is True and len(results["acc_matrix"]) == 2
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["resumed_from"].endswith("task_000")
    assert "continuing at task 1" in (run_dir / "launch.log").read_text()


def test_replay_command_keeps_recorded_overrides_and_pins_the_dir(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- method=replay\n- seed=3\n- resume=never\n")
    cmd = replay_command(tmp_path, ["trainer.epochs=2"])
    assert cmd[2:] == ["method=replay", "seed=3", "trainer.epochs=2", f"hydra.run.dir={tmp_path}", "resume=auto"]


def test_rerun_refuses_another_commit_and_a_non_run_dir(tmp_path):
    with pytest.raises(SystemExit, match="overrides.yaml does not exist"):
        rerun_main([str(tmp_path)])
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("[]\n")
    (tmp_path / "run_info.json").write_text(json.dumps({"git_sha": "0" * 40}))
    with pytest.raises(SystemExit, match=f"git checkout {'0' * 40}"):
        rerun_main([str(tmp_path)])
