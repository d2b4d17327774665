"""``python -m genattr.report``: the ablation table against hand-computed means and stds."""

from __future__ import annotations

import csv
import math

import pytest
from mlflow import MlflowClient

from genattr.report.__main__ import build_report, main
from genattr.tracking import sweep
from genattr.tracking.mlflow import MLflowTracker
from genattr.utils.errors import ConfigError

RESULTS = {("lorax", 0): 80.0, ("lorax", 1): 90.0, ("lorax", 2): 85.0, ("replay", 0): 60.0, ("replay", 1): 70.0}


@pytest.fixture
def sweep_dir(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = MLflowTracker(uri, experiment="ablation")
    parent.start(run_name="sweep", tags={"genattr.sweep": "parent"}, params={})
    folder = tmp_path / "sweep"
    sweep.write_parent(
        folder,
        {
            "parent_run_id": parent.run_id,
            "tracking_uri": uri,
            "experiment": "ablation",
            "experiment_id": parent.experiment_id,
        },
    )
    for (method, seed), aa in RESULTS.items():
        child = MLflowTracker(uri, experiment="ablation")
        tags = {"method": method, "data": "cddb_hard", "seed": str(seed)}
        child.start(run_name=f"{method}-{seed}", tags=tags, params={}, parent_run_id=parent.run_id)
        child.log_metrics({"final/aa": aa, "final/bwt": -seed, "train/loss": 1.0})
        child.end()
    crashed = MLflowTracker(uri, experiment="ablation")  # a failed seed must not enter the mean
    crashed.start(
        run_name="x",
        tags={"method": "replay", "data": "cddb_hard", "seed": "2"},
        params={},
        parent_run_id=parent.run_id,
    )
    crashed.log_metrics({"final/aa": 0.0})
    crashed.end("FAILED")
    parent.end()
    return folder, uri, parent.run_id


def test_sweep_report_means_stds_and_parent_artifacts(sweep_dir):
    folder, uri, parent_id = sweep_dir
    markdown = build_report(str(folder)).read_text()
    lorax_std = math.sqrt(((80 - 85) ** 2 + (90 - 85) ** 2 + 0) / 2)  # sample std of 80, 90, 85 = 5
    assert f"| lorax | cddb_hard | 3 | 85.00 ± {lorax_std:.2f} | -1.00 ± 1.00 | 0 |" in markdown
    assert "| replay | cddb_hard | 2 | 65.00 ± 7.07 | -0.50 ± 0.71 | 1 |" in markdown
    assert "train/loss" not in markdown  # only final/* metrics by default
    rows = list(csv.DictReader(open(folder / "report" / "report.csv")))
    assert rows[0]["method"] == "lorax" and float(rows[0]["final/aa mean"]) == 85.0 and rows[0]["seeds"] == "0 1 2"
    assert (folder / "report" / "final_aa.png").stat().st_size > 1000
    logged = {a.path for a in MlflowClient(uri).list_artifacts(parent_id, "report")}
    assert {"report/report.md", "report/report.csv", "report/final_aa.png"} <= logged


def test_experiment_report_and_chosen_metrics(sweep_dir, tmp_path, capsys):
    _, uri, _ = sweep_dir
    code = main(["ablation", "--tracking-uri", uri, "--metrics", "final/aa", "--out", str(tmp_path / "r")])
    assert code == 0
    text = (tmp_path / "r" / "report.md").read_text()
    assert "final/bwt" not in text and "| replay | cddb_hard | 2 | 65.00 ± 7.07 | 1 |" in text
    assert "report:" in capsys.readouterr().out


def test_bad_targets_are_one_clear_sentence(tmp_path, capsys):
    with pytest.raises(ConfigError, match="not a genattr sweep dir"):
        build_report(str(tmp_path))
    uri = f"sqlite:///{tmp_path / 'empty.db'}"
    assert main(["nope", "--tracking-uri", uri]) == 1
    assert "neither a folder nor an MLflow experiment" in capsys.readouterr().err
