"""The staged-run engine, its training helpers and progress lines, on a toy family (no method involved)."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from genattr.engine import faults
from genattr.engine.checkpoint import Checkpointer
from genattr.engine.progress import progress_line, track
from genattr.engine.stages import StagedRun
from genattr.engine.training import gather_rows, optimizer_step, prepared, shard
from genattr.methods.base import Report, RunContext
from genattr.utils.errors import ConfigError


class Recorder:
    run_id = "run-123"

    def __init__(self) -> None:
        self.metrics: list[tuple[dict[str, float], int | None]] = []

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.append((dict(metrics), step))


class Toy:
    """Three stages; each draws from every RNG, so a resume is only identical if the engine restores them."""

    stage_kind = "step"

    def __init__(self, names=("a", "b", "c"), grow: bool = False) -> None:
        self.names = list(names)
        self.grow = grow
        self.draws: list[float] = []
        self.ran: list[int] = []

    def stage_names(self) -> list[str]:
        return self.names

    def identity(self) -> dict[str, Any]:
        return {"names": tuple(self.names[:3])}

    def run_stage(self, k: int) -> dict[str, float]:
        self.ran.append(k)
        self.draws.append(random.random() + float(np.random.rand()) + float(torch.rand(())))
        if self.grow and k == len(self.names) - 1 and len(self.names) < 5:
            self.names.append(f"extra{len(self.names)}")  # stages known only once earlier ones ran
        return {"draw": self.draws[-1]}

    def checkpoint(self, k: int):
        return (lambda folder: (folder / "draws.json").write_text(json.dumps(self.draws))), {"n": len(self.draws)}

    def restore(self, folder: Path, state) -> None:
        self.draws = json.loads((folder / "draws.json").read_text())
        assert state["n"] == len(self.draws)

    def report(self, *, completed: bool, last: int) -> Report:
        return Report({}, {"draws": self.draws, "last": last}, completed=completed)


def _ctx(tmp_path: Path, stop: int | None = None, fingerprint: str = "fp") -> RunContext:
    AcceleratorState._reset_state(True)
    return RunContext(
        accelerator=Accelerator(cpu=True),
        tracker=Recorder(),
        output_dir=tmp_path,
        checkpoints=Checkpointer(tmp_path / "checkpoints", keep_last=5),
        seed=0,
        stop_after_task=stop,
        config_fingerprint=fingerprint,
    )


def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def test_a_stopped_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    _seed()
    whole = StagedRun(Toy(), _ctx(tmp_path / "whole"), title="toy").run()
    _seed()
    ctx = _ctx(tmp_path / "split", stop=0)
    first = StagedRun(Toy(), ctx, title="toy").run()
    assert not first.completed and first.results["last"] == 0
    state = json.loads((tmp_path / "split" / "checkpoints" / "task_000" / "state.json").read_text())
    assert state["mlflow_run_id"] == "run-123" and state["identity"] == {"names": ["a", "b", "c"]}
    assert state["stage"] == "a" and state["kind"] == "step" and state["n"] == 1
    assert (tmp_path / "split" / "checkpoints" / "task_000" / "rng.safetensors").is_file()
    random.seed(99), np.random.seed(99), torch.manual_seed(99)  # another process, other RNG states
    toy = Toy()
    ctx2 = _ctx(tmp_path / "split")
    second = StagedRun(toy, ctx2, title="toy").run()
    assert second.completed and toy.ran == [1, 2]  # stage 0 is not redone
    assert second.results["draws"] == whole.results["draws"]
    steps = [s for m, s in ctx2.tracker.metrics if "draw" in m]
    assert steps == [1, 2] and ({"resume/from_step": 0.0}, 0) in ctx2.tracker.metrics
    assert all("time/step_s" in m for m, s in ctx2.tracker.metrics if "draw" in m)


def test_a_checkpoint_of_other_settings_or_another_identity_is_refused(tmp_path):
    StagedRun(Toy(), _ctx(tmp_path, stop=0), title="toy").run()
    with pytest.raises(ConfigError, match="other settings"):
        StagedRun(Toy(), _ctx(tmp_path, fingerprint="other"), title="toy").run()
    with pytest.raises(ConfigError, match=r"is for \{'names': \['a', 'b', 'c'\]\}"):
        StagedRun(Toy(names=("x", "y", "z")), _ctx(tmp_path), title="toy").run()


def test_stages_may_grow_while_running_and_family_state_keeps_off_the_engine_keys(tmp_path):
    toy = Toy(grow=True)
    report = StagedRun(toy, _ctx(tmp_path), title="toy").run()
    assert toy.ran == [0, 1, 2, 3, 4] and report.results["last"] == 4

    class Clash(Toy):
        def checkpoint(self, k):
            return (lambda folder: None), {"task": 3}

    with pytest.raises(RuntimeError, match="engine's keys"):
        StagedRun(Clash(), _ctx(tmp_path / "clash"), title="toy").run()


def test_a_fault_point_kills_with_sigkill_at_the_named_item_and_a_bad_one_is_refused():
    """GENATTR_FAULT (genattr.engine.faults) as the kill/resume tests use it: a real SIGKILL, at the n-th progress
    item of the named stage only, with a line saying where."""
    code = (
        "from genattr.engine import faults\n"
        "faults.enter_stage(0); list(faults.ticking(range(9)))\n"
        "faults.enter_stage(1)\n"
        "for i in faults.ticking(range(9)): print('item', i, flush=True)\n"
    )
    env = dict(os.environ, GENATTR_FAULT="stage:1:3")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout.split() == ["item", "0", "item", "1"] and "SIGKILL in stage 1 at progress item 3" in proc.stderr
    assert faults._parse("checkpoint:2:files") == ("checkpoint", 2, "files") and faults._parse("") is None
    for bad in ("stage:1:0", "stage:x:1", "checkpoint:1:halfway", "task:1:1"):
        with pytest.raises(ConfigError, match="GENATTR_FAULT"):
            faults._parse(bad)


def test_progress_lines_are_plain_with_rate_and_eta_when_the_output_is_a_file(caplog):
    assert progress_line("task 0", 120, 480, 60.0, "batch") == "task 0: 120/480 batch (25%), 2.00 batch/s, 3m00s left"
    assert progress_line("sweep", 5, None, 2.0) == "sweep: 5 it, 2.50 it/s"
    with caplog.at_level(logging.INFO, logger="genattr.progress"):
        assert list(track(range(4), desc="toy", every_s=0.0)) == [0, 1, 2, 3]
        assert list(track(range(3), desc="quiet", main_process=False)) == [0, 1, 2]
    lines = [r.getMessage() for r in caplog.records if r.name == "genattr.progress"]
    assert lines[-1].startswith("toy: 4/4 it (100%)") and not any("quiet" in line for line in lines)
    assert not any("\r" in line for line in lines)


def test_shards_cover_the_items_once_in_order():
    class FakeAcc:
        def __init__(self, rank: int, world: int) -> None:
            self.process_index, self.num_processes = rank, world

    for n, world in ((10, 3), (2, 4), (0, 2), (7, 1)):
        parts = [shard(FakeAcc(r, world), n) for r in range(world)]
        assert [i for p in parts for i in p] == list(range(n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    AcceleratorState._reset_state(True)
    acc = Accelerator(cpu=True)
    rows = np.arange(6).reshape(3, 2)
    assert gather_rows(acc, rows, 3) is rows


def test_training_runs_prepared_under_autocast_and_steps_after_the_accumulation_window():
    AcceleratorState._reset_state(True)
    acc = Accelerator(cpu=True, mixed_precision="bf16", gradient_accumulation_steps=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    seen: list[torch.dtype] = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(torch.randn(8, 4), torch.randn(8, 1)), batch_size=2)
    before = model[0].weight.detach().clone()
    with prepared(acc, model, opt, loader) as p:
        assert p.raw is model and acc._optimizers and acc._models
        for i, (x, y) in enumerate(p.loader):
            optimizer_step(acc, p, lambda m, x=x, y=y: nn.functional.mse_loss(m(x).float(), y), clip_norm=1.0)
            changed = not torch.equal(model[0].weight, before)
            assert changed == (i >= 1)  # the first micro-step only accumulates
    assert seen and all(d == torch.bfloat16 for d in seen)  # the forward really ran in bf16
    assert not acc._optimizers and not acc._models  # Accelerate let go of the stage's objects
    model(torch.randn(1, 4))
    assert seen[-1] == torch.float32  # and the module got its own forward back


def test_the_accelerate_guard_catches_a_loop_that_bypasses_accelerate():
    from helpers.accelerate_guard import accelerate_guard

    AcceleratorState._reset_state(True)
    acc = Accelerator(cpu=True, mixed_precision="bf16")
    model = nn.Sequential(nn.Linear(3, 1))  # prepare() casts the top module's own outputs back to fp32
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with accelerate_guard(everywhere=True):
        with pytest.raises(AssertionError, match="outside Accelerator.backward"):
            model(torch.randn(2, 3)).sum().backward()
        with pytest.raises(AssertionError, match="no prepared model"):
            acc.backward(model(torch.randn(2, 3)).sum())
        with pytest.raises(AssertionError, match="never prepared"):
            opt.step()
    with accelerate_guard(everywhere=True) as guard:
        with prepared(acc, model, opt) as p:
            optimizer_step(acc, p, lambda m: m(torch.randn(2, 3)).float().sum())
    assert guard.backwards == 1 and guard.steps == 1 and guard.train_dtypes == [torch.bfloat16]
    with accelerate_guard() as guard:  # by default only the engine's stages are checked (not twin building)
        model(torch.randn(2, 3)).sum().backward()
        opt.step()
    model(torch.randn(2, 3)).sum().backward()  # outside the guard, plain torch again


_RACE = """
import json, sys, time
from datetime import timedelta
from pathlib import Path
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.utils import gather_object
from genattr.engine.checkpoint import Checkpointer
from genattr.engine.stages import StagedRun
from genattr.methods.base import Report, RunContext

class Quick:
    stage_kind = "stage"
    def __init__(self, acc):
        self.acc, self.ran = acc, []
    def stage_names(self):
        return ["instant", "gathers"]
    def identity(self):
        return {}
    def run_stage(self, k):
        self.ran.append(k)
        if k == 1:
            assert gather_object([self.acc.process_index]) == [0, 1]
        return {}
    def checkpoint(self, k):
        return (lambda folder: None), {}
    def restore(self, folder, state):
        pass
    def report(self, *, completed, last):
        return Report({}, {"ran": self.ran}, completed=completed)

acc = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=30))])
out = Path(sys.argv[1])
class Tracker:
    run_id = None
    def log_metrics(self, metrics, step=None):
        pass
ctx = RunContext(accelerator=acc, tracker=Tracker(), output_dir=out, checkpoints=Checkpointer(out / "checkpoints",
    keep_last=5), seed=0, stop_after_task=None, config_fingerprint="fp")
family = Quick(acc)
if acc.process_index == 1:
    time.sleep(3)  # a slow start: the main process has long written the first stage's checkpoint
report = StagedRun(family, ctx, title="race").run()
(out / f"rank{acc.process_index}.json").write_text(json.dumps(report.results["ran"]))
"""


def test_every_process_resumes_from_the_checkpoint_the_main_process_chose(tmp_path):
    """Under torchrun a process that starts late must not find the checkpoint the main process wrote after a quick
    first stage: it would skip that stage and pair its collectives with the wrong ones (a hang)."""
    script = tmp_path / "race.py"
    script.write_text(_RACE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run([*cmd, str(tmp_path)], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ran = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ran == [[0, 1], [0, 1]]  # both ran both stages: none resumed from the other's checkpoint


def test_max_steps_caps_every_prepared_training_at_whole_optimiser_steps():
    """trainer.max_steps counts optimiser steps (closed accumulation windows), not micro-batches."""
    from genattr.engine.training import set_max_steps

    AcceleratorState._reset_state(True)
    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = nn.Linear(4, 1)
    loader = DataLoader(TensorDataset(torch.randn(32, 4), torch.randn(32, 1)), batch_size=2)
    try:
        set_max_steps(3)
        with prepared(acc, model, torch.optim.SGD(model.parameters(), lr=0.1), loader) as p:
            micro = 0
            for x, y in p.loader:
                optimizer_step(acc, p, lambda m, x=x, y=y: nn.functional.mse_loss(m(x), y))
                micro += 1
                if p.capped:
                    break
        assert (p.steps, micro) == (3, 6)
        set_max_steps(None)
        with prepared(acc, model, torch.optim.SGD(model.parameters(), lr=0.1), loader) as p:
            for x, y in p.loader:
                optimizer_step(acc, p, lambda m, x=x, y=y: nn.functional.mse_loss(m(x), y))
        assert p.steps == 8 and not p.capped
        for bad in (0, -1, 1.5, "2", True):
            with pytest.raises(ConfigError, match="trainer.max_steps"):
                set_max_steps(bad)
    finally:
        set_max_steps(None)
