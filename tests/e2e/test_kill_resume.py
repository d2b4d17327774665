"""kill -9 at any moment, every family: the same command, rerun, ends as if nothing had happened.

For each family a small twin run (``SMALL`` of ``test_engine_families``, at least two stages) is launched as a user
launches it (``python launch.py ...``, SQLite MLflow store, ``resume=auto``) and killed with a real SIGKILL, once
in the middle of a stage and once in the middle of a checkpoint write (its rerun); one more rerun then finishes.
The kill points come from ``GENATTR_FAULT`` (:mod:`genattr.engine.faults`: the process kills itself at the n-th
progress item of stage k, or between the files and ``state.json`` of checkpoint k), so every machine dies at the
same place. The run must end with:

* ``results.json`` equal to an uninterrupted run's (the reference, run in this process without tracking), float
  for float: on CPU every stage restores the weights, the optimiser state and the RNG state it was checkpointed
  with, the data order comes from seeded generators, and the retrain cache writes exact float32 copies, so the
  maths is deterministic and nothing may differ. Left out of the comparison are only what says how *this
  session* ran, not what it computed: wall-clock timings and ``leave_k_out.retrains_run`` (retrains trained in
  this session, not read from the cache; ``helpers.results.comparable``), ``per_process`` (the rows each process
  handled in this session) and ``resumed_stages``;
* one MLflow run, FINISHED, with no metric logged twice at a step, and every stage's ``time/<kind>_s`` at its
  step exactly once (nothing lost either);
* at most one stage of work redone per kill: each rerun starts at the stage the kill interrupted;
* no partial checkpoint ever read: the killed write left a ``.task_<k>.tmp`` folder without ``state.json``,
  whose files the test then truncates, so that a rerun reading any of them would fail; the rerun continues
  from checkpoint k - 1 and the finished run leaves no temp folder behind.

The README's kill/resume matrix lists these cases.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import compose_config
from helpers.distributed import launch_command
from helpers.results import comparable
from mlflow import MlflowClient
from test_engine_families import SMALL

from genattr.engine.faults import ENV
from genattr.run import run

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Case:
    overrides: list[str]
    #: ``GENATTR_FAULT`` of each killed attempt, in order; one more attempt then finishes the run
    kills: tuple[str, ...]


#: family/data -> the small run and where its attempts die (``stage:<k>:<n>``: at the n-th progress item of
#: stage k, e.g. a batch or an epoch, counted on these settings so that work of the stage was done before and
#: is left after; ``checkpoint:<k>:files``: checkpoint k's files written, its state.json not)
CASES: dict[str, Case] = {
    # 2 tasks of 2 epochs, 5 batches each in task 1: killed in its 1st epoch, then during its checkpoint; first
    # also right after checkpoint 0 was committed (nothing may be redone, nothing lost)
    "lorax/cddb_hard": Case(SMALL["continual"], ("checkpoint:0:renamed", "stage:1:4", "checkpoint:1:files")),
    # 2 tasks of 2 epochs: killed as task 1's second epoch begins, then during its checkpoint
    "gslora/casia100": Case(SMALL["forgetting"], ("stage:1:2", "checkpoint:1:files")),
    # 2 windows, 88 micro-batches and scoring batches in window 1: killed at the 30th, then during its checkpoint
    "detector/aigenbench": Case(SMALL["detection"], ("stage:1:30", "checkpoint:1:files")),
    # stages prepare, query 0, retrains reference / random-4 / unlearn-4: killed as the random retrain starts
    # its 2nd epoch, then while the last retrain's checkpoint is written (that retrain is cached by then)
    "unlearn/mscoco": Case(SMALL["attribution"], ("stage:3:2", "checkpoint:4:files")),
    # each stage: in the models stage (before any checkpoint: the rerun must continue the same MLflow run), in
    # the features stage, and during the score functions' checkpoint
    "prada/rarvar": Case(SMALL["tracing"], ("stage:0:5", "stage:1:30", "checkpoint:2:files")),
}

#: results.json keys that say how the last session ran, besides what ``helpers.results.comparable`` leaves out
RESUME_KEYS = frozenset({"per_process", "resumed_stages"})
STARTS = re.compile(r"\[genattr\.engine\.stages\]\[INFO\] - \w+ (\d+)/\d+ \(.*\) starts$")
#: the engine's stage kind of each method (its metric ``time/<kind>_s``)
STAGE_KIND = {"lorax": "task", "gslora": "task", "detector": "window", "unlearn": "stage", "prada": "stage"}


def without_session(results: Any) -> Any:
    """``results`` without the :data:`RESUME_KEYS`, at any depth."""
    if isinstance(results, dict):
        return {k: without_session(v) for k, v in results.items() if k not in RESUME_KEYS}
    if isinstance(results, list):
        return [without_session(v) for v in results]
    return results


def stage_count(checkpoints: Path) -> int:
    """How many stages the finished run had (its last checkpoint's; AbU's stage list grows while it runs)."""
    last = sorted(checkpoints.glob("task_*"))[-1]
    return int(json.loads((last / "state.json").read_text())["task"]) + 1


@dataclass
class Attempt:
    fault: str | None
    returncode: int
    output: str

    @property
    def started(self) -> list[int]:
        """The stages this attempt began, in order (0-based)."""
        return [int(m.group(1)) - 1 for m in map(STARTS.search, self.output.splitlines()) if m]


def attempt(overrides: list[str], folder: Path, fault: str | None) -> Attempt:
    command, env = launch_command(overrides, folder)
    if fault is not None:
        env[ENV] = fault
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=folder)
    return Attempt(fault, proc.returncode, proc.stdout + proc.stderr)


def truncate_partial_checkpoint(checkpoints: Path, k: int) -> None:
    """Check that the killed write left checkpoint ``k`` half-written, then make every file of it unreadable."""
    tmp, final = checkpoints / f".task_{k:03d}.tmp", checkpoints / f"task_{k:03d}"
    files = [p for p in tmp.rglob("*") if p.is_file()]
    assert tmp.is_dir() and files and not (tmp / "state.json").exists() and not final.exists(), sorted(files)
    for path in files:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("case", sorted(CASES))
def test_kill_9_anywhere_then_the_same_command_ends_as_an_uninterrupted_run(case: str, tmp_path: Path) -> None:
    overrides, kills = CASES[case].overrides, CASES[case].kills
    quiet = [*overrides, "tracking=none"]
    reference = run(compose_config(quiet, tmp_path / "reference"), overrides=quiet)
    assert reference.completed
    expected = json.loads((tmp_path / "reference" / "results.json").read_text())

    folder = tmp_path / "killed"
    folder.mkdir()
    checkpoints = folder / "run" / "checkpoints"
    attempts: list[Attempt] = []
    for fault in (*kills, None):
        got = attempt(overrides, folder, fault)
        attempts.append(got)
        if fault is None:
            assert got.returncode == 0, got.output[-6000:]
            break
        assert got.returncode == -signal.SIGKILL and f"{ENV}: SIGKILL" in got.output, got.output[-6000:]
        where, k, what = fault.split(":")
        if (where, what) == ("checkpoint", "files"):
            truncate_partial_checkpoint(checkpoints, int(k))

    # at most one stage redone per kill: each rerun begins with the stage its predecessor was killed in (the one
    # after it when the kill came after that stage's checkpoint was committed), and goes on in order
    stages = stage_count(checkpoints)
    for before, after in zip(attempts, attempts[1:], strict=False):
        assert before.fault is not None
        where, k, what = before.fault.split(":")
        assert before.started and before.started[-1] == int(k), (before.fault, before.started)
        first = int(k) + 1 if what == "renamed" else int(k)
        assert after.started == list(range(first, first + len(after.started))), (before.fault, after.started)
    assert attempts[-1].started[-1] == stages - 1
    done = [k for a in attempts for k in a.started]
    print(case, "stages begun per attempt:", [a.started for a in attempts])
    assert len(done) - stages == sum(not f.endswith(":renamed") for f in kills)

    # no partial checkpoint was read (the truncated files would have failed the rerun) and none is left
    assert not [p.name for p in checkpoints.iterdir() if p.name.startswith(".")]

    # the same results as the uninterrupted run
    final = json.loads((folder / "run" / "results.json").read_text())
    assert comparable(without_session(final)) == comparable(without_session(expected))

    # one FINISHED MLflow run, every metric step once, every stage's time at its step
    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "distributed"]
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"], [(r.info.run_id, r.info.status) for r in runs]
    run_id = runs[0].info.run_id
    assert json.loads((folder / "run" / "run_info.json").read_text())["mlflow_run_id"] == run_id
    kind = STAGE_KIND[case.split("/")[0]]
    for key in runs[0].data.metrics:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert len(steps) == len(set(steps)), (key, sorted(steps))
        if key == f"time/{kind}_s":
            assert sorted(steps) == list(range(stages)), steps
