"""AbU (method=unlearn, data=mscoco): the real-format loader, the core maths on a tiny UNet, the retrieval
metrics against hand-computed rankings, coupled retraining, and end to end on the twin (AbU retrieves the
planted exemplars far above random and above the pixel baseline; leave-K-out produces Delta L / Delta G;
a run stopped mid-way resumes to the same scores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch
from conftest import compose_config
from omegaconf import OmegaConf

from genattr.config import apply_twin_profile, check_compatibility, explicit_override_keys
from genattr.data.mscoco import load_mscoco
from genattr.engine.training import shard
from genattr.methods.attribution.losses import loss_sweep, max_over_flips
from genattr.methods.attribution.retrain_job import PlannedRetrain
from genattr.methods.attribution.retrain_plan import read_plan
from genattr.methods.attribution.training import TrainRecipe, train_coupled
from genattr.methods.attribution.unlearning import (
    diagonal_fisher,
    fisher_sums,
    restore,
    select_parameters,
    snapshot,
    unlearn,
)
from genattr.metrics.attribution import average_precision, grade_against_random, positive_ranks, recall_at_k
from genattr.models.diffusion import build_diffusion
from genattr.run import config_fingerprint, run
from genattr.utils.errors import ConfigError, DataError
from genattr.utils.instantiate import build

ROOT = Path(__file__).resolve().parents[1]

UNET = dict(
    sample_size=8,
    in_channels=3,
    out_channels=3,
    layers_per_block=1,
    block_out_channels=[8, 16],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
    cross_attention_dim=8,
    attention_head_dim=4,
    norm_num_groups=4,
)


def _tiny(seed: int = 0):
    return build_diffusion(unet=UNET, scheduler={}, seed=seed)


def _data(n: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lat = rng.uniform(-1, 1, size=(n, 3, 8, 8)).astype(np.float32)
    return np.concatenate([lat, lat[..., ::-1]]), rng.normal(size=(n, 2, 3, 8)).astype(np.float32)


def _write_release(folder: Path, n: int = 6, s: int = 2) -> None:
    lat, txt = _data(n)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "coco17_train_latents.npy", lat)
    np.save(folder / "coco17_train_text_embeddings.npy", txt)
    np.save(folder / "coco17_sample_latents.npy", lat[:s])
    np.save(folder / "coco17_sample_text_embeddings.npy", txt[:s, :1])
    torch.save(_tiny().unet.state_dict(), folder / "model.bin")
    (folder / "query_ground_truth.json").write_text(json.dumps({"1": [0, 3]}))


# -- data --------------------------------------------------------------------------------------------
def test_release_format_loads_memory_mapped(tmp_path):
    _write_release(tmp_path)
    p = load_mscoco(tmp_path)
    assert p.n_train == 6 and p.n_queries == 2 and p.train_latents.shape == (12, 3, 8, 8)
    assert isinstance(p.train_text, np.memmap) and isinstance(p.train_latents, np.memmap)
    assert p.unet_weights.name == "model.bin" and p.fisher is None and p.ground_truth == {1: [0, 3]}
    assert p.kind == "attribution" and p.source == "real"


@pytest.mark.parametrize(
    "breakage, match",
    [
        (lambda f: (f / "coco17_train_text_embeddings.npy").unlink(), "coco17_train_text_embeddings.npy does not"),
        (lambda f: np.save(f / "coco17_train_latents.npy", np.zeros((7, 3, 8, 8), np.float32)), "2N rows"),
        (lambda f: (f / "coco17_sample_latents.npy").write_text("junk"), "coco17_sample_latents.npy is not"),
        (lambda f: (f / "model.bin").unlink(), "model.bin does not exist"),
        (lambda f: (f / "query_ground_truth.json").write_text('{"0": [99]}'), "out of range"),
    ],
)
def test_bad_release_files_are_one_sentence_naming_the_file(tmp_path, breakage, match):
    _write_release(tmp_path)
    breakage(tmp_path)
    with pytest.raises(DataError, match=match):
        load_mscoco(tmp_path)


def test_unlearn_composes_with_mscoco_and_the_twin_profile_applies(compose_cfg):
    ov = ["method=unlearn", "data=mscoco", "method.unlearn.alpha=0.002"]
    cfg = compose_cfg(ov)
    check_compatibility(cfg)
    assert cfg.model.name == "unet_mscoco" and cfg.model.unet.cross_attention_dim == 1024
    assert cfg.trainer.epochs == 200 and cfg.method.unlearn.draws == 50000
    apply_twin_profile(cfg, explicit_override_keys(ov))
    assert cfg.model.unet.sample_size == 8 and cfg.trainer.batch_size == 32 and cfg.method.unlearn.draws == 512
    assert cfg.method.unlearn.alpha == 0.002  # the command line wins
    OmegaConf.resolve(cfg)
    assert cfg.data.twin.model.unet.sample_size == 8  # the twin trains theta0 with the run's own model


@pytest.mark.parametrize("subset", ["cross_attn_kv", "cross_attn", "attn", "all"])
def test_weight_subsets(compose_cfg, subset):
    cfg = compose_cfg(["method=unlearn", "data=mscoco", f"method.weights={subset}"])
    names = select_parameters(_tiny().unet, cfg.method.weights)
    assert names and all(("attn2" in n) for n in names) == subset.startswith("cross")
    if subset == "cross_attn_kv":
        assert all(".to_k." in n or ".to_v." in n for n in names) and len(names) == 8


def test_unknown_weight_subset_is_a_config_error():
    with pytest.raises(ConfigError, match="method.weights=kv"):
        select_parameters(_tiny().unet, "kv")


# -- core maths --------------------------------------------------------------------------------------
def test_loss_sweep_is_bit_identical_whatever_the_batch_size_subset_or_order():
    m, (lat, txt) = _tiny(), _data()
    ts = list(range(0, 1000, 84))  # 12 timesteps x 2 captions x 24 rows = 576 jobs: 3 micro-batches, padded tail
    ref = loss_sweep(m, lat, txt, range(24), ts, seed=3, batch_size=256)
    for bs in (1, 7, 300, 5000):  # 7 and 300 divide neither the 576 jobs nor the micro-batch
        assert torch.equal(
            torch.from_numpy(loss_sweep(m, lat, txt, range(24), ts, seed=3, batch_size=bs)), torch.from_numpy(ref)
        ), bs
    c = loss_sweep(m, lat, txt, [20, 5, 11], ts, seed=3, batch_size=8)  # other subset, order and chunking
    assert np.array_equal(ref[[20, 5, 11]], c)
    assert not np.allclose(ref, loss_sweep(m, lat, txt, range(24), ts, seed=4), rtol=1e-3)


def test_fisher_by_vmap_equals_the_brute_force_per_sample_loop():
    m, (lat, txt) = _tiny(), _data(6)
    names = select_parameters(m.unet, "cross_attn_kv")
    fast = diagonal_fisher(m, lat, txt, names, epochs=1, batch_size=5, seed=1)
    slow = diagonal_fisher(m, lat, txt, names, epochs=1, batch_size=5, seed=1, naive=True)
    for n in names:
        assert fast[n].dtype == torch.float64 and fast[n].abs().sum() > 0
        torch.testing.assert_close(fast[n], slow[n], rtol=1e-4, atol=1e-12)


def test_fisher_batches_shared_by_two_processes_sum_to_the_one_process_fisher():
    """What each process of a 2-process run computes: its contiguous half of every pass's batches of the one
    random stream, each batch exactly as one process computes it; the halves' sums add up to the whole."""

    def process(rank: int) -> SimpleNamespace:  # what engine.training.shard reads of an Accelerator
        return SimpleNamespace(num_processes=2, process_index=rank)

    m, (lat, txt) = _tiny(), _data(6)
    names = select_parameters(m.unet, "cross_attn_kv")
    whole, n = fisher_sums(m, lat, txt, names, epochs=2, batch_size=5, seed=1)
    halves = [
        fisher_sums(m, lat, txt, names, epochs=2, batch_size=5, seed=1, share=lambda k, r=r: shard(process(r), k))
        for r in (0, 1)
    ]
    assert n == 2 * 12 and halves[0][1] == 2 * 10 and halves[1][1] == 2 * 2  # 3 batches a pass: 2 + 1
    for name in names:
        torch.testing.assert_close(halves[0][0][name] + halves[1][0][name], whole[name], rtol=1e-12, atol=0)
    fisher = diagonal_fisher(m, lat, txt, names, epochs=2, batch_size=5, seed=1)
    assert all(torch.equal(fisher[name], (whole[name] / n).cpu()) for name in names)


def test_alpha_zero_gives_zero_tau_and_unlearning_raises_the_query_loss_most():
    m, (lat, txt) = _tiny(), _data()
    names = select_parameters(m.unet, "cross_attn_kv")
    fisher = diagonal_fisher(m, lat, txt, names, epochs=1, batch_size=24)
    ts = list(range(0, 1000, 20))
    q_lat, q_txt = lat[:1].copy() * 0.5, txt[:1, :1] + 0.5  # a query that is not a training image
    q_rows = np.concatenate([q_lat, q_lat])
    before = loss_sweep(m, lat, txt, range(24), ts, seed=0, batch_size=400)
    q_before = loss_sweep(m, q_rows, q_txt, [0], ts, seed=9)
    saved = snapshot(m, names)
    x0, cond = torch.from_numpy(q_lat[0]), torch.from_numpy(q_txt[0, 0])
    unlearn(m, names, fisher, x0, cond, alpha=0.0, n_train=12, draws=64, batch_size=32)
    tau0 = max_over_flips(loss_sweep(m, lat, txt, range(24), ts, seed=0, batch_size=400) - before)
    assert np.array_equal(tau0, np.zeros(12))
    # enough (t, eps) draws that the ascent direction is the query's gradient, not one noise draw
    unlearn(m, names, fisher, x0, cond, alpha=1e-3, n_train=12, draws=1000, batch_size=100)
    tau = loss_sweep(m, lat, txt, range(24), ts, seed=0, batch_size=400) - before
    q_tau = loss_sweep(m, q_rows, q_txt, [0], ts, seed=9) - q_before
    assert q_tau[0] > 0 and q_tau[0] > 2 * np.abs(tau).max(), (q_tau, tau)  # more than any training image
    restore(m, saved)
    assert np.array_equal(loss_sweep(m, lat, txt, range(24), ts, seed=0, batch_size=400), before)


def test_coupled_retraining_removing_nothing_reproduces_theta0_bit_for_bit():
    lat, txt = _data(8)
    recipe = TrainRecipe(epochs=3, batch_size=4, lr=1e-3, ema_decay=0.9, seed=5)
    theta0 = train_coupled(_tiny(), lat, txt, recipe)
    again = train_coupled(_tiny(), lat, txt, recipe, removed=[])
    removed = train_coupled(_tiny(), lat, txt, recipe, removed=[2])
    assert all(torch.equal(theta0[k], again[k]) for k in theta0)
    assert any(not torch.equal(theta0[k], removed[k]) for k in theta0)


# -- metrics -----------------------------------------------------------------------------------------
def test_recall_and_ap_against_hand_computed_rankings():
    order = np.array([4, 0, 7, 2, 9, 1, 3, 5, 6, 8])
    pos = [0, 2, 8]  # at ranks 1, 3, 9 (0-based)
    assert positive_ranks(order, pos) == [1, 3, 9]
    assert recall_at_k(order, pos, 2) == pytest.approx(1 / 3)
    assert recall_at_k(order, pos, 4) == pytest.approx(2 / 3)
    assert average_precision(order, pos) == pytest.approx((1 / 2 + 2 / 4 + 3 / 10) / 3)
    assert average_precision(np.array([0, 2, 8, 1, 3, 4, 5, 6, 7, 9]), pos) == 1.0
    from sklearn.metrics import average_precision_score

    scores = -np.argsort(order).astype(float)  # higher = earlier in the ranking
    y = np.isin(np.arange(10), pos)
    assert average_precision(order, pos) == pytest.approx(average_precision_score(y, scores))


def test_grading_against_the_random_floor():
    g = grade_against_random([3.0, 4.0, 5.0], [[1.0, 2.0], [1.0, 1.0], [2.0, 2.0]])
    assert g["floor_mean"] == pytest.approx((1.5 + 1 + 2) / 3) and g["gain_mean"] == pytest.approx(2.5)
    assert g["beats_all_random"] == 1.0 and g["gain_z"] > 2


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


def test_retrain_job_and_plan_errors_are_one_sentence(tmp_path, compose_cfg):
    cfg = compose_cfg(["method=unlearn_retrain", "data=mscoco", f"method.plan={tmp_path / 'p.json'}", "method.job=2"])
    check_compatibility(cfg)
    assert cfg.method.job == 2 and cfg.model.name == "unet_mscoco"
    with pytest.raises(ConfigError, match="needs method.plan"):
        PlannedRetrain(name="unlearn_retrain", model={}, trainer={})
    with pytest.raises(DataError, match="p.json does not exist"):
        read_plan(tmp_path / "p.json")
    (tmp_path / "p.json").write_text('{"version": 1}')  # before the coupling was part of a plan
    with pytest.raises(DataError, match="is not a version-2 retrain plan"):
        read_plan(tmp_path / "p.json")
    cfg = compose_cfg(["method=unlearn", "data=mscoco", "method.evaluation.retrains=somewhere"])
    with pytest.raises(Exception, match="method.evaluation.retrains=somewhere is unknown"):  # (Hydra wraps it)
        build(cfg.method, model=OmegaConf.to_container(cfg.model), trainer=OmegaConf.to_container(cfg.trainer))
    # where retrains are trained never changes results: not part of the checkpoint fingerprint
    a, b = (
        compose_cfg(["method=unlearn", "data=mscoco", f"method.evaluation.retrains={m}"]) for m in ("plan", "cached")
    )
    c = compose_cfg(["method=unlearn", "data=mscoco", "method.evaluation.ks=[3]"])
    assert config_fingerprint(a) == config_fingerprint(b) != config_fingerprint(c)
