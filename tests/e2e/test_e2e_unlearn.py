"""AbU (method=unlearn, data=mscoco) end to end on its twin: AbU retrieves the planted exemplars far above random
and above the pixel baseline; leave-K-out produces Delta L / Delta G; a run stopped mid-way (also among its
retrains) resumes to the same scores; retrains fan out as Hydra jobs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import compose_config

from genattr.run import run
from genattr.utils.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[2]


# -- end to end on the twin --------------------------------------------------------------------------
def _overrides(db: Path) -> list[str]:
    return [
        "method=unlearn",
        "data=mscoco",
        "tracking=mlflow",
        f"tracking.tracking_uri=sqlite:///{db}",
        f"tracking.artifact_location={db.parent / 'artifacts'}",
        "tracking.experiment=e2e_unlearn",
    ]


@pytest.fixture(scope="module")
def twin_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("unlearn")
    ov = _overrides(base / "mlflow.db")
    report = run(compose_config(ov, base / "run"), overrides=ov)
    return report, base


@pytest.mark.slow
def test_abu_retrieves_the_planted_exemplars_far_above_random_and_pixel(twin_run):
    report, base = twin_run
    res = json.loads((base / "run" / "results.json").read_text())
    assert res["data_source"] == "twin" and res["n_ground_truth_queries"] == 8
    maps = res["map"]
    # 4 exemplars among 64 images: a random ranking has AP ~0.13 in expectation
    assert maps["unlearn"] > 0.25 and maps["unlearn"] > maps["random"] + 0.1, maps
    assert maps["unlearn"] > maps["pixel"], maps

    def median_rank(m: str) -> float:
        return float(np.mean([np.median(q[m]["gt_ranks"]) for q in res["per_query"]]))

    assert median_rank("unlearn") < median_rank("pixel") and median_rank("unlearn") < 20, res["per_query"][0]
    assert all(q["unlearn"]["tau"]["mean"] > 0 for q in res["per_query"])  # unlearning raises training losses
    assert (base / "run" / "plots" / "query_0000.png").stat().st_size > 0
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{base / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("e2e_unlearn").experiment_id])
    assert runs[0].data.metrics["map/unlearn"] == pytest.approx(maps["unlearn"])
    assert {"map/influence", "map/text", "map/clip", "map/dino", "recall_at_4/unlearn"} <= set(runs[0].data.metrics)
    # the twin has no tower weights: random-init towers, recorded as such in the results, the tags and the summary
    assert res["feature_towers"]["dino"] == {"name": "vit_base_patch16_224.dino", "weights": "random_init"}
    assert runs[0].data.tags["features.clip"] == "random_init" and "mAP[clip(random-init tower)]" in report.summary
    assert res["settings"] == {
        "damping": 0.0,
        "caption_noise": "independent",
        "coupling": "coupled",
        "text_baseline": "encoder",
    }
    # the twin's latents are its pixels; its text baseline uses the model's own embeddings (twin profile)
    assert res["baseline_inputs"] == {"pixel": "pixels", "text": "encoder"}
    assert runs[0].data.tags["baseline_inputs.text"] == "encoder"


@pytest.mark.slow
def test_a_stopped_run_resumes_to_the_same_scores(twin_run, tmp_path):
    ov = ["method=unlearn", "data=mscoco", "tracking=none"]
    folder = tmp_path / "r"
    first = run(compose_config([*ov, "stop_after_task=2"], folder), overrides=ov)
    assert not first.completed and (folder / "checkpoints" / "task_002" / "state.json").is_file()
    second = run(compose_config(ov, folder), overrides=ov)
    assert second.completed and second.results["map"] == twin_run[0].results["map"]
    with pytest.raises(ConfigError, match="other settings"):
        other = [*ov, "method.unlearn.alpha=0.5"]
        run(compose_config(other, folder), overrides=other)


# a 6-epoch twin: cheap retrains; the numbers are not meant to separate methods here
SMOKE = [
    "method=unlearn",
    "data=mscoco",
    "tracking=none",
    "trainer.epochs=6",
    "method.baselines=[random,pixel]",
    "method.queries=[0]",
    "method.evaluation.enabled=true",
    "method.evaluation.methods=[unlearn]",
    "method.evaluation.ks=[4]",
    "method.evaluation.random_seeds=1",
    "method.evaluation.oracle=false",
    "method.evaluation.loss_time_samples=10",
    "method.evaluation.regen.steps=10",
]


@pytest.fixture(scope="module")
def smoke_lko(tmp_path_factory):
    """The inline leave-K-out smoke run (retrains in the shared test cache: trained once, then read)."""
    out = tmp_path_factory.mktemp("lko")
    return run(compose_config(SMOKE, out), overrides=SMOKE), out


@pytest.mark.slow
def test_leave_k_out_smoke_gives_delta_l_delta_g_and_the_reference_is_theta0(smoke_lko):
    report, out = smoke_lko
    lko = report.results["leave_k_out"]
    assert lko["reference_equals_theta0"] is True and lko["coupling"] == "coupled"  # the twin profile's choice
    assert set(lko["jobs"]) == {"reference|None|0", "random|0|4", "unlearn|0|4"}
    top4 = report.results["per_query"][0]["unlearn"]["top"][:4]
    assert lko["jobs"]["unlearn|0|4"]["removed"] == sorted(top4)
    assert lko["jobs"]["reference|None|0"]["dl"] == [0.0] and lko["jobs"]["reference|None|0"]["dg"] == [0.0]
    d = lko["table"]["unlearn"]["k4"]
    assert np.isfinite(d["dl"]["mean"]) and d["dl"]["mean"] != 0 and d["dg"]["mean"] > 0
    # Delta G: pixel MSE and CLIP similarity of DDPM + CFG 7.5 regenerations (10 steps here), tower tagged
    assert lko["delta_g"]["regen"] == {"scheduler": "ddpm", "steps": 10, "guidance_scale": 7.5}
    assert lko["delta_g"]["space"] == "pixels" and lko["delta_g"]["clip"]["weights"] == "random_init"
    assert lko["jobs"]["reference|None|0"]["dg_clip"] == [pytest.approx(1.0)] and d["dg_clip"]["mean"] < 1
    assert (out / "plots" / "delta_l_vs_k.png").is_file()
    plan = json.loads((out / "retrain_plan.json").read_text())  # inline runs write the plan too
    assert [j["uses"] for j in plan["jobs"]] == [["reference|None|0"], ["random|0|4"], ["unlearn|0|4"]]


@pytest.mark.slow
def test_a_run_stopped_among_its_retrains_resumes_to_the_same_evaluation(smoke_lko, tmp_path):
    """The retrain stages follow the query stages once the scores exist; a run stopped after its first retrain
    continues with the second (the checkpoint holds the measured jobs) and ends with the uninterrupted numbers."""
    folder = tmp_path / "r"  # the retrains are in the shared test cache (smoke_lko trained them): read, not trained
    first = run(compose_config([*SMOKE, "stop_after_task=2"], folder), overrides=SMOKE)
    state = json.loads((folder / "checkpoints" / "task_002" / "state.json").read_text())
    assert (
        not first.completed
        and state["stage"] == "retrain reference|None|0"
        and list(state["lko"]) == ["reference|None|0"]
    )
    assert state["identity"]["evaluated_queries"] == [0] and state["identity"]["queries"] == [0]
    second = run(compose_config(SMOKE, folder), overrides=SMOKE)
    lko, want = second.results["leave_k_out"], smoke_lko[0].results["leave_k_out"]
    assert second.completed and set(lko["jobs"]) == set(want["jobs"])
    assert {k: (v["dl"], v["dg"]) for k, v in lko["jobs"].items()} == {
        k: (v["dl"], v["dg"]) for k, v in want["jobs"].items()
    }
    assert lko["table"] == want["table"]


@pytest.mark.slow
def test_retrains_fan_out_as_hydra_jobs_and_the_evaluation_then_only_reads_the_cache(tmp_path, smoke_lko):
    cache, out = tmp_path / "cache", tmp_path / "eval"  # a fresh retrain cache: the Hydra jobs must fill it
    ov = [*SMOKE, f"method.cache_dir={cache}"]
    planned = run(compose_config([*ov, "method.evaluation.retrains=plan"], out), overrides=ov)
    assert not planned.completed and "method.evaluation.retrains=cached" in planned.summary
    plan_path = out / "retrain_plan.json"
    plan = json.loads(plan_path.read_text())
    keys = [j["key"] for j in plan["jobs"]]
    assert plan["jobs"] == json.loads((smoke_lko[1] / "retrain_plan.json").read_text())["jobs"]
    assert plan["jobs"][0]["removed"] == [] and plan["cache_folder"] == str((cache / "unlearn_retrains").resolve())
    assert "method=unlearn_retrain" in plan["command"] and "method.job=0,1,2" in plan["command"]
    cached = [*ov, "method.evaluation.retrains=cached"]
    with pytest.raises(DataError, match=f"3 of 3 planned retrains .*first missing: {keys[0]}"):
        run(compose_config(cached, out), overrides=cached)
    # one Hydra job per retrain through genattr's entry point (basic launcher: the jobs run in one process)
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch.py"),
            "-m",
            "method=unlearn_retrain",
            "data=mscoco",
            "trainer.epochs=6",  # the twin of the evaluation (its theta0 is trained with these settings)
            "tracking=none",
            f"method.plan={plan_path}",
            "method.job=0,1,2",
            f"hydra.sweep.dir={sweep}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = [json.loads((sweep / str(i) / "results.json").read_text())["jobs"] for i in range(3)]
    assert [j[0]["key"] for j in jobs] == keys and all(j[0]["trained"] for j in jobs)
    assert sorted(p.stem for p in (cache / "unlearn_retrains").glob("*.safetensors")) == sorted(keys)
    # the evaluation continues after its scoring stages (retrains is not result-shaping) and trains nothing;
    # the reference retrain, trained by a Hydra job in another process, is theta0 bit for bit
    done = run(compose_config(cached, out), overrides=cached)
    lko = done.results["leave_k_out"]
    assert done.completed and lko["retrains_run"] == 0 and lko["reference_equals_theta0"] is True
    inline = smoke_lko[0].results["leave_k_out"]["jobs"]  # the same numbers as retraining in-process
    assert {k: (v["dl"], v["dg"]) for k, v in lko["jobs"].items()} == {k: (v["dl"], v["dg"]) for k, v in inline.items()}


@pytest.mark.slow
def test_independent_retrains_are_graded_against_theta0_itself(tmp_path, smoke_lko):
    """coupling=independent (the paper): no reference retrain; every retrain is a fresh run, Delta L is taken
    against the given theta0, and the retrains land under other cache keys than the coupled ones."""
    ov = [*SMOKE, "method.evaluation.coupling=independent", f"method.cache_dir={tmp_path / 'cache'}"]
    report = run(compose_config(ov, tmp_path / "ind"), overrides=ov)
    lko = report.results["leave_k_out"]
    assert lko["coupling"] == "independent" and lko["reference"] == "theta0" and lko["reference_equals_theta0"]
    assert set(lko["jobs"]) == {"random|0|4", "unlearn|0|4"} and lko["retrains_run"] == 2
    assert report.results["settings"]["coupling"] == "independent"
    plan = json.loads((tmp_path / "ind" / "retrain_plan.json").read_text())
    coupled = json.loads((smoke_lko[1] / "retrain_plan.json").read_text())
    assert plan["coupling"] == "independent" and coupled["coupling"] == "coupled"
    assert {j["key"] for j in plan["jobs"]}.isdisjoint(j["key"] for j in coupled["jobs"])
    # the same removal, retrained from scratch instead of coupled, moves the query's loss differently
    assert lko["jobs"]["random|0|4"]["dl"] != smoke_lko[0].results["leave_k_out"]["jobs"]["random|0|4"]["dl"]
