"""The AI-GenBench detector end to end on its twin: it learns every window's generators above chance, scores as
the benchmark defines, and a run stopped between windows resumes to the same metrics in the same MLflow run."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import compose_config

from genattr.metrics.detection import auroc
from genattr.run import run

# -- end to end on the twin ----------------------------------------------------------------
SMALL = ["data.twin.n_windows=3", "data.twin.n_train=32", "data.twin.n_val=24"]


def _overrides(db: Path, *extra: str) -> list[str]:
    return [
        "method=detector",
        "data=aigenbench",
        *SMALL,
        "tracking=mlflow",
        f"tracking.tracking_uri=sqlite:///{db}",
        f"tracking.artifact_location={db.parent / 'artifacts'}",
        "tracking.experiment=detector",
        *extra,
    ]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("detector")
    ov = _overrides(base / "mlflow.db")
    run(compose_config(ov, base / "full"), overrides=ov)
    return base, base / "full"


@pytest.mark.slow
def test_detector_learns_the_twin_and_scores_as_defined(full_run) -> None:
    _, folder = full_run
    res = json.loads((folder / "results.json").read_text())
    assert res["completed"] and len(res["per_window"]) == 3
    assert min(res["growing_auroc"]) > 0.75, res["growing_auroc"]
    assert res["score"] == pytest.approx(np.mean(res["next_auroc"][:2]))
    assert res["per_window"][2]["next_is_fallback"] and not res["per_window"][1]["next_is_fallback"]
    assert set(res["per_window"][0]["per_generator_auroc"]) == {g for w in res["windows"] for g in w}
    npz = np.load(folder / "predictions" / "window_0" / "predictions_validate_all.npz")
    keys = {"fused_scores", "fused_labels", "fused_generator_ids", "fused_identifiers", "fused_losses"}
    keys |= {"crop_scores", "crop_labels", "crop_generator_ids", "crop_identifiers", "crop_losses"}
    keys |= {"crop_to_image_index", "identifier", "generator_id_to_name", "windows_timeline", "pairing"}
    assert keys <= set(npz.files)
    assert npz["windows_timeline"].shape == (3, 2) and npz["generator_id_to_name"][0] == ""
    assert ((npz["pairing"] == -1) == (npz["fused_labels"] == 1)).all()
    # the scores in the dump reproduce the reported AUROC of the whole validation set
    assert auroc(npz["fused_labels"], npz["fused_scores"]) == pytest.approx(res["per_window"][0]["all"]["auroc"])
    for plot in ("roc_next_period.png", "roc_final_all.png", "auroc_window_x_generator.png"):
        assert (folder / "plots" / plot).stat().st_size > 0
    last = folder / "checkpoints" / "task_002"  # the engine's folder: complete once renamed into place
    assert (last / "model.safetensors").is_file()
    state = json.loads((last / "state.json").read_text())
    assert state["kind"] == "window" and state["identity"] == {"windows": res["windows"]}
    assert [w["window"] for w in state["per_window"]] == [0, 1, 2] and state["global_step"] > 0


@pytest.mark.slow
def test_resume_after_a_stop_between_windows_gives_the_same_metrics(full_run) -> None:
    base, folder = full_run
    ov = _overrides(base / "mlflow.db", "stop_after_task=0")
    first = run(compose_config(ov, base / "resumed"), overrides=ov)
    assert not first.completed
    ov = _overrides(base / "mlflow.db")
    second = run(compose_config(ov, base / "resumed"), overrides=ov)
    assert second.completed
    full = json.loads((folder / "results.json").read_text())
    resumed = json.loads((base / "resumed" / "results.json").read_text())
    for key in ("next_auroc", "growing_auroc", "whole_auroc", "score"):
        assert resumed[key] == full[key], key
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{base / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("detector").experiment_id])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)  # the resumed run continued
    resumed_run = next(r for r in runs if r.data.tags["output_dir"].endswith("resumed"))
    steps = sorted(m.step for m in client.get_metric_history(resumed_run.info.run_id, "window/next/auroc"))
    assert steps == [0, 1, 2]
    assert resumed_run.data.metrics["final/score"] == pytest.approx(full["score"])
