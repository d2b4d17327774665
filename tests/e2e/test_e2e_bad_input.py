"""Issue 18's "done when" for bad input, as a user runs it: a CDDB-hard tree with a truncated JPEG in task 2.

``python launch.py data=cddb_hard data.root=<tree> data.on_bad_image=skip`` trains every task and reports the
skip; without ``skip`` the run fails before the first training step, with one sentence naming the file.
The tree is the cached CDDB twin (8 images per class) in the real layout, so both runs take well under a minute.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from helpers.bad_inputs import IMAGE_KINDS

from genattr.twins.cddb import ensure_cddb_twin

ROOT = Path(__file__).resolve().parents[2]
HARD = ["gaugan", "biggan", "wild", "whichfaceisreal", "san"]
TINY = ["profile=cpu", "trainer.epochs=1"]


@pytest.fixture(scope="module")
def bad_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The twin copied as a real CDDB root, plus a truncated JPEG among task 2's (wild) training fakes."""
    twin = ensure_cddb_twin(os.environ["GENATTR_CACHE"], tasks=HARD, n_train=8, n_val=8, strength=3.0)
    root = tmp_path_factory.mktemp("bad_cddb") / "CDDB"
    shutil.copytree(twin, root)
    truncated = next(k for k in IMAGE_KINDS if k.name == "truncated_jpeg")
    bad = root / "wild" / "train" / "1_fake" / "truncated.jpg"
    bad.write_bytes(truncated.make(40))
    return root, bad


def _launch(*args: str, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, str(ROOT / "launch.py"), "data=cddb_hard", *args, *TINY, f"hydra.run.dir={out}"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=out.parent,
    )


def test_skip_trains_every_task_and_reports_the_skip(bad_tree: tuple[Path, Path], tmp_path: Path) -> None:
    root, bad = bad_tree
    db = tmp_path / "mlflow.db"
    proc = _launch(
        f"data.root={root}",
        "data.on_bad_image=skip",
        f"tracking.tracking_uri=sqlite:///{db}",
        f"tracking.artifact_location={tmp_path / 'artifacts'}",
        out=tmp_path / "run",
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "skipped 1 bad images (data.on_bad_image=skip): {'truncated': 1}" in log
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["task_names"] == HARD and results["completed"]
    assert results["bad_images"]["total"] == 1 and results["bad_images"]["counts"] == {"truncated": 1}
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("genattr").experiment_id])
    assert run.info.status == "FINISHED" and run.data.metrics["data/bad_images_skipped"] == 1.0
    info = json.loads(Path(client.download_artifacts(run.info.run_id, "data/info.json", str(tmp_path))).read_text())
    assert info["bad_images"] == {"total": 1, "counts": {"truncated": 1}, "examples": {"truncated": [str(bad)]}}


def test_without_skip_the_bad_file_stops_the_run_before_training(bad_tree: tuple[Path, Path], tmp_path: Path) -> None:
    root, bad = bad_tree
    proc = _launch(f"data.root={root}", "tracking=none", out=tmp_path / "run")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log[-3000:]
    assert f"{bad} is truncated: it does not end with the JPEG end-of-image marker FF D9" in log
    assert "data.on_bad_image=skip" in log and "Traceback" not in log
    assert "task 1/5 (gaugan) starts" not in log and not (tmp_path / "run" / "checkpoints").exists()  # none trained
