"""AbU (method=unlearn, data=mscoco): the real-format loader, the core maths on a tiny UNet, the retrieval
metrics against hand-computed rankings, coupled retraining and the retrain plan's errors."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from genattr.config import apply_cpu_profile, check_compatibility, explicit_override_keys
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
from genattr.run import config_fingerprint
from genattr.utils.errors import ConfigError, DataError
from genattr.utils.instantiate import build

ROOT = Path(__file__).resolve().parents[2]

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


def test_unlearn_composes_with_mscoco_and_the_cpu_profile_applies(compose_cfg):
    ov = ["method=unlearn", "data=mscoco", "method.unlearn.alpha=0.002"]
    cfg = compose_cfg(ov)
    check_compatibility(cfg)
    assert cfg.model.name == "unet_mscoco" and cfg.model.unet.cross_attention_dim == 1024
    assert cfg.trainer.epochs == 200 and cfg.method.unlearn.draws == 50000
    apply_cpu_profile(cfg, explicit_override_keys(ov))
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
