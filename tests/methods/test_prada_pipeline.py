"""Unit tests of the model-tracer pipeline: decision rules, thresholds, calibrators, score functions, metrics, the
submission CSV, the task loader's errors, the method on a tiny fake task (both pipelines, resume) and config
composition of ``method=prada data=rarvar``."""

from __future__ import annotations

import csv
import json
import shutil
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import compose_config
from helpers.prada_fakes import FakeGenerator, FakeTokenizer, write_fake_task
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file

from genattr.config import apply_cpu_profile, check_compatibility
from genattr.data.rarvar import FAMILY_OF, LABELS, OUTLIER, build_rarvar, load_png, load_rarvar
from genattr.engine.checkpoint import Checkpointer
from genattr.methods.base import RunContext
from genattr.methods.tracing.calibration import fit_calibrator
from genattr.methods.tracing.classes import candidate_classes
from genattr.methods.tracing.decision import ZScorer, argmax_or_outlier, assign_family, fit_thresholds
from genattr.methods.tracing.inverse import augment, chunk_generator, generate_pairs, level_at
from genattr.methods.tracing.likelihood import logmeanexp, scale_slices, summary_features, token_loglik
from genattr.methods.tracing.method import ModelTracer
from genattr.methods.tracing.one_step import score_training_rows
from genattr.methods.tracing.outputs import write_submission
from genattr.methods.tracing.parallel import batch_share
from genattr.methods.tracing.score_function import ScoreFunction, fit_score_function, prada_negatives, score
from genattr.methods.tracing.signals import quant_loss_per_sample, signals_batch
from genattr.metrics.detection import auroc
from genattr.metrics.tracing import confusion, tracing_metrics
from genattr.tracking.base import NullTracker
from genattr.utils.errors import ConfigError, DataError
from genattr.utils.instantiate import META_KEYS, build

FAM = ("rar", "var")
STAGES = {"two_stage": ["models", "family", "variant"], "one_step": ["models", "features", "score_functions"]}
BUILD_KEYS = ("name", "root", "image_size", "models", "checkpoint_dir", "test_labels", "on_bad_image")


# ---------------------------------------------------------------------------------------------- decision rules
def test_assign_family_argmin_ties_to_rar_and_thresholds() -> None:
    z = np.array([[0.1, 0.5], [0.9, -0.2], [0.3, 0.3], [3.0, 2.5], [2.0, 5.0]])
    # row 2 is a tie -> rar; row 3: var wins (2.5) but exceeds var's threshold 2.0 -> outlier;
    # row 4: rar wins with 2.0 <= rar's threshold 2.0 -> rar (strictly above is an outlier)
    assert assign_family(z, [2.0, 2.0], FAM) == ["rar", "var", "rar", "outlier", "rar"]
    assert assign_family(z, [np.inf, np.inf], FAM) == ["rar", "var", "rar", "var", "rar"]


def test_zscorer_uses_own_family_train_images_only() -> None:
    logs = np.array([[1.0, 100.0], [3.0, 200.0], [50.0, 10.0], [70.0, 30.0]])
    fam = np.array([0, 0, 1, 1])
    zs = ZScorer.fit(logs, fam, 2)
    assert zs.mu.tolist() == [2.0, 20.0]
    assert zs.sigma == pytest.approx([np.std([1, 3], ddof=1), np.std([10, 30], ddof=1)])
    assert zs(np.array([[2.0, 20.0]])).tolist() == [[0.0, 0.0]]
    with pytest.raises(ConfigError):
        ZScorer.fit(logs[:3], np.array([0, 0, 1]), 2)


def test_threshold_strategies() -> None:
    rng = np.random.default_rng(0)
    train_z = rng.normal(size=(200, 2))
    train_fam = np.repeat([0, 1], 100)
    q = fit_thresholds("quantile", families=FAM, train_z=train_z, train_family=train_fam, q=0.9)
    assert q[0] == pytest.approx(np.quantile(train_z[:100, 0], 0.9))
    assert q[1] == pytest.approx(np.quantile(train_z[100:, 1], 0.9))
    assert fit_thresholds("zscore_k", families=FAM, train_z=train_z, train_family=train_fam, k=1.5).tolist() == [
        1.5,
        1.5,
    ]
    # val: own-family images at z ~ 0 on their own column, outliers far above on both
    val_z = np.array([[0.0, 5.0], [0.2, 4.0], [5.0, 0.1], [4.0, -0.3], [6.0, 7.0], [8.0, 6.5]])
    val_fam = ["rar", "rar", "var", "var", "outlier", "outlier"]
    taus = fit_thresholds(
        "val_opt", families=FAM, train_z=train_z, train_family=train_fam, val_z=val_z, val_family=val_fam
    )
    assert assign_family(val_z, taus, FAM) == val_fam
    with pytest.raises(ConfigError):
        fit_thresholds("val_opt", families=FAM, train_z=train_z, train_family=train_fam)
    with pytest.raises(ConfigError):
        fit_thresholds("median", families=FAM, train_z=train_z, train_family=train_fam)


def test_prada_argmax_with_outlier_floor() -> None:
    s = np.array([[-1.0, 2.0, 0.5], [-0.1, -0.2, -3.0], [0.3, 0.1, 0.2]])
    assert argmax_or_outlier(s, ["a", "b", "c"]) == ["b", "outlier", "a"]
    assert argmax_or_outlier(s, ["a", "b", "c"], floor=0.4) == ["b", "outlier", "outlier"]


# ---------------------------------------------------------------------------------------------- metrics, CSV
def test_tracing_metrics_match_hand_computation() -> None:
    true = ["var16", "var16", "rarb", "rarl", "outlier", "outlier", "var30", "rarxl"]
    pred = ["var16", "var20", "rarb", "outlier", "outlier", "rarb", "rarxl", "rarxl"]
    m = tracing_metrics(true, pred, family_of=FAMILY_OF, outlier=OUTLIER)
    assert m["accuracy"] == pytest.approx(100 * 4 / 8)
    # family: var/var, var/var, rar/rar, rar/out, out/out, out/rar, var/rar, rar/rar -> 5 of 8
    assert m["family_accuracy"] == pytest.approx(100 * 5 / 8)
    assert m["family_accuracy_generated"] == pytest.approx(100 * 4 / 6)  # rows 0, 1, 2, 7 of the 6 generated
    # generated with the right family: rows 0, 1, 2, 7 -> exact in 0, 2, 7
    assert m["variant_accuracy"] == pytest.approx(100 * 3 / 4)
    assert m["outlier_precision"] == pytest.approx(100 * 1 / 2)
    assert m["outlier_recall"] == pytest.approx(100 * 1 / 2)
    c = confusion(true, pred, LABELS)
    assert c.sum() == 8 and c[LABELS.index("var16"), LABELS.index("var20")] == 1 and np.trace(c) == 4


def test_submission_csv_format(tmp_path: Path) -> None:
    path = write_submission(tmp_path / "sub.csv", ["b.png", "a.png", "c.png"], ["outlier", "var16", "rarxxl"])
    rows = list(csv.reader(path.open()))
    assert rows == [["image_name", "label"], ["a.png", "var16"], ["b.png", "outlier"], ["c.png", "rarxxl"]]
    with pytest.raises(ValueError, match="not task labels"):
        write_submission(tmp_path / "bad.csv", ["a.png"], ["real"])


# ---------------------------------------------------------------------------------------------- Stage 2 / PRADA
def test_token_loglik_and_summaries_match_manual_softmax() -> None:
    gen = FakeGenerator(seed=3)
    tokens = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    labels = torch.tensor([0, 2])
    ll = token_loglik(gen, tokens, labels)
    lc = gen.table[labels].log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
    lg = ((1 + gen.cfg) * gen.table[labels] - gen.cfg * gen.table[4]).log_softmax(-1)
    assert torch.allclose(ll["cond"], lc) and torch.allclose(ll["guided"], lg.gather(-1, tokens[..., None])[..., 0])
    cands = np.array([[0, 1], [2, 3]])
    feats = summary_features(gen, tokens.numpy(), cands, batch_size=8, device=torch.device("cpu"))
    assert feats.shape == (2, 5) and np.all(feats[:, 4] == 1.0)  # no top-k: every token is in support
    # max aggregation keeps the candidate with the higher guided likelihood; row 1's true class (2) is a candidate
    g2 = token_loglik(gen, tokens[1:], torch.tensor([2]))["guided"].mean()
    g3 = token_loglik(gen, tokens[1:], torch.tensor([3]))["guided"].mean()
    assert feats[1, 2] == pytest.approx(float(max(g2, g3)), rel=1e-5)
    assert scale_slices([1, 2, 4], 21) == [(0, 1), (1, 5), (5, 21)] and scale_slices([], 64) == [(0, 64)]
    # PRADA's position groups: raster-order ranges for single-scale tokens; multi-scale keeps one range per scale
    assert scale_slices([], 10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert scale_slices([1, 2, 4], 21, 3) == [(0, 1), (1, 5), (5, 21)]
    with pytest.raises(ValueError, match="5 position groups for 4 tokens"):
        scale_slices([], 4, 5)


def test_calibrators_remove_the_big_model_bias() -> None:
    rng = np.random.default_rng(0)
    n, v = 200, 4
    truth = rng.integers(0, v, n)
    # every variant's likelihood grows with model size (bias), the own variant gets +0.5 on top
    base = rng.normal(size=(n, v, 4)) * 0.2 + np.arange(v)[None, :, None] * 1.0
    base[np.arange(n), truth] += 0.5
    assert np.mean(base[:, :, 2].argmax(1) == truth) < 0.5  # raw argmax is biased to the largest
    for kind in ("zscore", "logreg"):
        cal = fit_calibrator(kind, base, truth)
        assert np.mean(cal.predict(base) == truth) > 0.8, kind
        again = type(cal).from_json(json.loads(json.dumps(cal.to_json())))
        assert np.array_equal(again.predict(base), cal.predict(base))


def test_score_function_learns_the_cfg_log_ratio() -> None:
    rng = np.random.default_rng(0)
    n, length = 120, 21
    y = np.repeat([1.0, 0.0], n // 2)
    lu = rng.normal(-3.0, 1.0, size=(n, 1, length))
    lc = lu + rng.normal(0.0, 0.5, size=(n, 1, length)) + 0.8 * y[:, None, None]  # CFG inflates ℓ_c − ℓ_u
    feats = np.stack([lc, lu], -1).astype(np.float32)
    scales = scale_slices([1, 2, 4], length)
    fresh = ScoreFunction(scales)
    assert float(fresh.alpha.detach()) == 1.0 and torch.allclose(fresh.w, torch.full((3,), 1 / 3))
    model, hist = fit_score_function(feats[::2], y[::2], scales, acc=Accelerator(cpu=True), epochs=150, lr=1e-2)
    assert hist[-1] < hist[0]
    s = score(model, feats[1::2])
    assert auroc(y[1::2].astype(int), s) > 0.9
    assert np.mean((s > 0) == (y[1::2] > 0)) > 0.8


# jonasricker/prada (commit a2e3670) src/prada/prada.py ``PRADA`` and its released prada_weights/{rar_l,var_d20}/
# final.pt: parameter names and shapes (n_hidden 16, input_dim 1); RAR has one stage with w = [1.0] fixed
PRADA_KEYS = {
    "alpha": (1,),
    "net.0.weight": (16, 1),
    "net.0.bias": (16,),
    "net.2.weight": (16, 16),
    "net.2.bias": (16,),
    "net.4.weight": (1, 16),
    "net.4.bias": (1,),
}


def test_score_function_has_pradas_layout_and_fixes_a_single_stage_weight() -> None:
    var = ScoreFunction(scale_slices([1, 2, 3, 4, 5, 6, 8, 10, 13, 16], 680))
    rar = ScoreFunction(scale_slices([], 256))
    for sf, stages in ((var, 10), (rar, 1)):
        assert {k: tuple(v.shape) for k, v in sf.state_dict().items()} == {**PRADA_KEYS, "w": (stages,)}
    assert var.w.requires_grad and torch.allclose(var.w, torch.full((10,), 0.1))
    assert not rar.w.requires_grad and rar.w.tolist() == [1.0]
    # PRADA's predict.py trains with training_noise 0.1; the fit keeps w at 1 for one stage and the penalty at 0
    feats = np.random.default_rng(0).normal(size=(40, 1, 8, 2)).astype(np.float32)
    model, _ = fit_score_function(
        feats, np.r_[np.ones(20), np.zeros(20)], [(0, 8)], acc=Accelerator(cpu=True), epochs=20, lr=1e-2
    )
    assert model.w.tolist() == [1.0] and float(model.alpha.detach()) != 1.0


def test_score_function_noise_is_on_each_stages_combined_input() -> None:
    """PRADA's ``forward_single_token``: noise 0.1·std(x) on x = (2 − α)ℓ_c − αℓ_u, per stage, in training only.
    ℓ_u varies a lot but ℓ_c − ℓ_u little, and stage 2's x varies 10× stage 1's: noise on ℓ_c and ℓ_u separately,
    or one std for all stages, would be far larger in stage 1."""
    rng = np.random.default_rng(0)
    lu = rng.normal(0.0, 50.0, size=(256, 1, 40))
    lc = lu + np.concatenate([rng.normal(0, 1.0, (256, 1, 20)), rng.normal(0, 10.0, (256, 1, 20))], -1)
    feats = torch.as_tensor(np.stack([lc, lu], -1), dtype=torch.float32)
    sf = ScoreFunction([(0, 20), (20, 40)], noise=0.1)
    seen = []

    class Record(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x[..., 0].detach())
            return x

    sf.net = Record()
    x = (feats[..., 0] - feats[..., 1]).detach()  # α = 1
    sf.eval()
    sf.per_candidate(feats)
    assert torch.equal(seen[0], x[..., :20]) and torch.equal(seen[1], x[..., 20:])  # no noise when scoring
    seen.clear()
    sf.train()
    sf.per_candidate(feats)
    for stage, (a, b) in enumerate(((0, 20), (20, 40))):
        ratio = float((seen[stage] - x[..., a:b]).std() / x[..., a:b].std())
        assert 0.09 < ratio < 0.11, (stage, ratio)


def test_score_function_loss_is_pradas_mean_bce() -> None:
    """PRADA: BCEWithLogitsLoss() (mean over images) on labels smoothed to 0.025 / 0.975, + 0.1·(‖w‖₁ − 1)²."""
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(30, 1, 21, 2)).astype(np.float32)
    y = (np.arange(30) < 5).astype(np.float32)  # 5 positives, 25 negatives
    scales = scale_slices([1, 2, 4], 21)
    acc = Accelerator(cpu=True)
    _, hist = fit_score_function(feats, y, scales, acc=acc, epochs=1, noise=0.0, seed=7, balance=False)
    torch.manual_seed(7)
    fresh = ScoreFunction(scales)
    with torch.no_grad():
        logits = fresh(torch.as_tensor(feats))
    t = torch.as_tensor(y) * 0.95 + 0.025
    bce = -(t * torch.nn.functional.logsigmoid(logits) + (1 - t) * torch.nn.functional.logsigmoid(-logits)).mean()
    assert hist[0] == pytest.approx(float(bce), rel=1e-5)  # the w penalty is 0 at w = 1/S
    _, balanced = fit_score_function(feats, y, scales, acc=acc, epochs=1, noise=0.0, seed=7, balance=True)
    assert balanced[0] != pytest.approx(hist[0], rel=1e-3)  # on 5 : 25 rows the class weighting differs
    # on PRADA's own 1 : 1 data (250 own + 250 real) the balanced loss is its plain mean, step for step
    even = (np.arange(30) < 15).astype(np.float32)
    _, plain = fit_score_function(feats, even, scales, acc=acc, epochs=3, noise=0.0, seed=7, balance=False)
    _, weighted = fit_score_function(feats, even, scales, acc=acc, epochs=3, noise=0.0, seed=7, balance=True)
    assert weighted == pytest.approx(plain, rel=1e-6)


def test_sweeps_share_whole_batches_and_samples_have_a_stream_per_chunk() -> None:
    """What makes N processes compute the one-process numbers: each takes whole batches of the one-process sweep
    (every row once, in order), and a chunk of fresh samples draws from its own seed, not from a stream that runs
    on from the chunks before it (which another process would not have drawn)."""

    class FakeAcc:
        def __init__(self, rank: int, world: int) -> None:
            self.process_index, self.num_processes = rank, world

    for n, batch, world in ((100, 16, 2), (100, 16, 3), (10, 16, 2), (64, 16, 4), (0, 8, 2)):
        shares = [batch_share(FakeAcc(r, world), n, batch) for r in range(world)]
        assert [i for sh in shares for i in sh] == list(range(n))
        assert all(sh.start % batch == 0 for sh in shares if len(sh))  # batches of the one-process sweep
    tok, gens = FakeTokenizer(seed=1), {v: FakeGenerator(seed=i) for i, v in enumerate(("var16", "var20"))}
    whole, made = generate_pairs(tok, gens, per_variant=5, seed=3, batch_size=2, device=torch.device("cpu"))
    assert made == 10 and whole.variants == ["var16"] * 5 + ["var20"] * 5
    # var20's third chunk (its fifth sample, row 9) is what that chunk's own stream gives, whatever ran before
    g = chunk_generator(3, 1, 2, torch.device("cpu"))
    labels = torch.randint(0, 4, (1,), generator=g)
    assert torch.equal(whole.classes[9:], labels) and torch.equal(whole.tokens[9:], gens["var20"].sample(labels, g))


def test_candidate_classes() -> None:
    assert candidate_classes("null", 2, num_classes=5, null_class=5).tolist() == [[5], [5]]
    assert candidate_classes("all", 1, num_classes=3, null_class=3).tolist() == [[0, 1, 2]]
    assert candidate_classes("oracle", 2, num_classes=5, null_class=5, oracle=np.array([2, -1])).tolist() == [[2], [5]]
    with pytest.raises(ConfigError, match="oracle"):
        candidate_classes("oracle", 2, num_classes=5, null_class=5)


# ---------------------------------------------------------------------------------------------- loader
@pytest.fixture(scope="module")
def fake_task(tmp_path_factory) -> Path:
    return write_fake_task(tmp_path_factory.mktemp("fake_task") / "task")


def _copy(task: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "task"
    shutil.copytree(task, dst)
    return dst


def test_loader_reads_the_task_layout_as_is(fake_task: Path) -> None:
    p = load_rarvar(fake_task, image_size=8)
    assert p.kind == "tracing" and len(p.train) == 8 * 12 and len(p.val) == 9 * 6 and p.test.labels is not None
    assert set(p.train.labels) == set(LABELS[:8]) and set(p.val.labels) == set(LABELS)
    assert p.models["var"].generator_checkpoints["var30"].name == "var30.safetensors"
    img = load_png(p.test.paths[0])
    raw = np.asarray(Image.open(p.test.paths[0]))
    assert img.dtype == torch.uint8 and np.array_equal(img.permute(1, 2, 0).numpy(), raw)  # bit-identical, no resize


@pytest.mark.parametrize(
    ("breakage", "error", "match"),
    [
        ("test_subfolder", DataError, "sub-folder of test"),
        ("no_test", DataError, "test does not exist"),
        ("unknown_label", DataError, "not a label folder"),
        ("outlier_in_train", DataError, "outlier folder in train"),
        ("wrong_size", DataError, "is 9x9 but the task images are 8x8"),
        ("undecodable", DataError, "could not be read"),
        ("missing_checkpoint", ConfigError, r"variants\.rarl\.checkpoint=.*rarl\.safetensors does not exist"),
    ],
)
def test_loader_errors_name_the_file(fake_task: Path, tmp_path: Path, breakage: str, error, match: str) -> None:
    root = _copy(fake_task, tmp_path)
    if breakage == "test_subfolder":
        (root / "test" / "extra").mkdir()
    elif breakage == "no_test":
        shutil.rmtree(root / "test")
    elif breakage == "unknown_label":
        (root / "train" / "var99").mkdir()
    elif breakage == "outlier_in_train":
        (root / "train" / "outlier").mkdir()
    elif breakage == "wrong_size":
        Image.new("RGB", (9, 9)).save(root / "test" / "zz_big.png")
    elif breakage == "undecodable":
        (root / "val" / "rarb" / "broken.png").write_bytes(b"not a png")
    else:
        (root / "checkpoints" / "rar" / "rarl.safetensors").unlink()
    with pytest.raises(error, match=match):
        load_rarvar(root, image_size=8)


# ---------------------------------------------------------------------------------------------- the method
def _ctx(out: Path, **kw) -> RunContext:
    return RunContext(
        accelerator=Accelerator(cpu=True),
        tracker=NullTracker(),
        output_dir=out,
        checkpoints=Checkpointer(out / "checkpoints", keep_last=1),
        seed=0,
        config_fingerprint="fp",
        **kw,
    )


@cache
def _yaml_method() -> dict[str, Any]:
    """``method.*`` of ``method=prada`` as composed from the YAML (paper scale, no twin profile)."""
    return OmegaConf.to_container(compose_config(["method=prada", "data=rarvar"], Path("unused")).method, resolve=True)


def _method(changes: dict[str, Any] | None = None) -> ModelTracer:
    """The tracer of the YAML's complete ``method.*`` with some dotted keys replaced."""
    cfg = OmegaConf.create(_yaml_method())
    for key, value in (changes or {}).items():
        OmegaConf.update(cfg, key, value, merge=False)
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg).items() if k not in (*META_KEYS, "_target_")}
    return ModelTracer(model={}, trainer={}, **kwargs)  # as ``build`` calls it, without Hydra's error wrapper


def _tracer(pipeline: str, changes: dict[str, Any] | None = None) -> ModelTracer:
    """A fast tracer for the fake task: oracle classes, short fits."""
    fast = {
        "pipeline": pipeline,
        "class_source": "oracle",
        "batch_size": 64,
        "inverse.rar": {"epochs": 3, "lr": 1e-2, "batch_size": 16, "augment": None},
        "inverse.var": {"epochs": 3, "lr": 1e-2, "batch_size": 16, "augment": None},
        "prada.epochs": 60,
        "prada.lr": 1e-2,
    }
    return _method({**fast, **(changes or {})})


@pytest.mark.parametrize("pipeline", ["two_stage", "one_step"])
def test_method_runs_writes_outputs_and_resumes(fake_task: Path, tmp_path: Path, pipeline: str) -> None:
    protocol = load_rarvar(fake_task, image_size=8)
    out = tmp_path / pipeline
    stopped = _tracer(pipeline).run(protocol, _ctx(out, stop_after_task=0))
    assert not stopped.completed and Checkpointer(out / "checkpoints").latest()[1]["stage"] == "models"
    report = _tracer(pipeline).run(protocol, _ctx(out))  # resume=auto: stage 0 is not run again
    assert report.completed and report.results["resumed_stages"] == ["models"]
    assert list(report.results["timings_s"]) == list(STAGES[pipeline])
    rows = list(csv.reader((out / "submission.csv").open()))
    assert rows[0] == ["image_name", "label"] and len(rows) == len(protocol.test) + 1
    assert sorted(r[0] for r in rows[1:]) == sorted(protocol.test.names) and {r[1] for r in rows[1:]} <= set(LABELS)
    for split in ("val", "test"):
        assert {"accuracy", "family_accuracy", "variant_accuracy", "outlier_precision"} <= set(report.results[split])
    assert (out / "plots" / "confusion_test.png").is_file() and (out / "plots" / "scores_var_val.png").is_file()
    with pytest.raises(ConfigError, match="other settings"):
        _tracer(pipeline).run(protocol, RunContext(**{**_ctx(out).__dict__, "config_fingerprint": "other"}))


def test_prada_adds_fresh_samples_of_every_model(fake_task: Path, tmp_path: Path) -> None:
    protocol = load_rarvar(fake_task, image_size=8)
    base = _tracer("one_step").run(protocol, _ctx(tmp_path / "plain")).results["stage_details"]["prada"]

    def tracer() -> ModelTracer:
        return _tracer("one_step", {"prada.generated_per_variant": 3})

    # stop after the feature stage and resume: the samples and their features come back from the checkpoint
    assert not tracer().run(protocol, _ctx(tmp_path / "gen", stop_after_task=1)).completed
    report = tracer().run(protocol, _ctx(tmp_path / "gen"))
    assert report.results["resumed_stages"] == ["models", "features"]
    meta = report.results["stage_details"]["prada"]
    assert base["n_generated"] == 0 and meta["n_generated"] == 3 * len(LABELS[:8])
    # the default negatives (all three sources): each model gains the 7 other models' fresh samples as negatives
    assert all(meta["n_negatives"][v] == base["n_negatives"][v] + 21 for v in LABELS[:8])
    assert report.completed and (tmp_path / "gen" / "submission.csv").is_file()


def test_prada_position_groups_give_single_scale_score_functions_one_weight_per_group(
    fake_task: Path, tmp_path: Path
) -> None:
    # both fake families are single-scale (4 tokens); multi-scale tokens keep one weight per scale (scale_slices)
    protocol = load_rarvar(fake_task, image_size=8)
    report = _tracer("one_step", {"prada.epochs": 5, "prada.position_groups": 3}).run(protocol, _ctx(tmp_path))
    (weights,) = (tmp_path / "checkpoints").rglob("weights.safetensors")
    w = load_file(str(weights))
    assert report.completed and all(w[f"score.{v}.w"].shape == (3,) for v in LABELS[:8])
    # more groups than tokens (4 here) fails naming the key, after the features stage was checkpointed
    with pytest.raises(ConfigError, match=r"method\.prada\.position_groups=5 for var: 5 position groups for 4"):
        _tracer("one_step", {"prada.epochs": 5, "prada.position_groups": 5}).run(protocol, _ctx(tmp_path / "five"))


def test_method_rejects_bad_flags() -> None:
    with pytest.raises(ConfigError, match="pipeline"):
        _method({"pipeline": "three_stage"})
    with pytest.raises(ConfigError, match="class_source"):
        _method({"class_source": "guess"})
    with pytest.raises(ConfigError, match="signal"):
        _method({"stage1.signal": "psnr"})
    with pytest.raises(ConfigError, match=r"method\.stage1\.quant_reduce='max'"):
        _method({"stage1.quant_reduce": "max"})
    with pytest.raises(ConfigError, match=r"method\.stage1\.quant_reduce\.var='max'"):
        _method({"stage1.quant_reduce": {"rar": "median", "var": "max"}})
    with pytest.raises(ConfigError, match="unknown families"):
        _method({"stage1.quant_reduce": {"maskgit": "median", "rar": "mean", "var": "mean"}})
    # a mapping names every family (the YAML holds the one default: one value for both)
    with pytest.raises(ConfigError, match=r"method\.stage1\.quant_reduce has no value for \['var'\]"):
        _method({"stage1.quant_reduce": {"rar": "median"}})
    per_family = _method({"stage1.quant_reduce": {"rar": "median", "var": "mean"}}).settings.quant_reduce
    assert per_family == {"var": "mean", "rar": "median"}
    with pytest.raises(ConfigError, match=r"method\.prada\.negatives=\['real'\]"):
        _method({"prada.negatives": ["real"]})
    with pytest.raises(ConfigError, match=r"method\.prada\.generated_per_variant=-1"):
        _method({"prada.generated_per_variant": -1})
    with pytest.raises(ConfigError, match="non-empty"):
        _method({"prada.negatives": []})
    with pytest.raises(ConfigError, match=r"method\.prada\.position_groups=0"):
        _method({"prada.position_groups": 0})
    with pytest.raises(ConfigError, match=r"method\.prada\.tokens='stage2'"):
        _method({"prada.tokens": "stage2"})
    with pytest.raises(ConfigError, match=r"method\.pairs\.source='disk'"):
        _method({"pairs.source": "disk"})
    both = _method({"pairs.per_variant": {"rar": 96, "var": 64}}).settings.pairs_per_variant
    assert both == {"var": 64, "rar": 96}
    assert _method({"pairs.per_variant": 8}).settings.pairs_per_variant == {"var": 8, "rar": 8}
    with pytest.raises(ConfigError, match=r"method\.pairs\.per_variant\.rar=0"):
        _method({"pairs.per_variant": {"rar": 0, "var": 8}})
    with pytest.raises(ConfigError, match=r"method\.pairs\.per_variant=\[8\]"):
        _method({"pairs.per_variant": [8]})
    # every key comes from the YAML: a partial method config is refused, naming what is missing
    partial = {k: v for k, v in _yaml_method().items() if k not in ("stage2", "_target_", *META_KEYS)}
    with pytest.raises(TypeError, match="stage2"):
        ModelTracer(model={}, trainer={}, **partial)
    assert prada_negatives("val_outliers") == ["val_outliers"]
    labels = np.asarray(["var16", "var20", "rarb", "rarl", "var16"])
    assert score_training_rows(labels, "var16", ["other_family"]).tolist() == [True, False, True, True, True]
    assert score_training_rows(labels, "var16", ["same_family"]).tolist() == [True, True, False, False, True]
    assert score_training_rows(labels, "rarl", ["val_outliers"]).tolist() == [False, False, False, True, False]
    assert prada_negatives(["val_outliers", "other_family"]) == ["other_family", "val_outliers"]


# ---------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("pipeline", ["two_stage", "one_step"])
def test_config_composes_for_both_pipelines(compose_cfg, pipeline: str) -> None:
    overrides = ["method=prada", "data=rarvar", f"method.pipeline={pipeline}", "method.class_source=all"]
    cfg = compose_cfg(overrides)
    changes = apply_cpu_profile(cfg, {"method", "data", "method.pipeline", "method.class_source"})
    check_compatibility(cfg)
    assert cfg.method.pipeline == pipeline and cfg.data.image_size == 256  # the twin's files say 32 (below)
    assert cfg.method.class_source == "all"  # command line wins over the cpu profile
    assert any(c.startswith("method.prada.epochs") for c in changes)
    tracer = build(cfg.method, model={}, trainer={})
    assert isinstance(tracer, ModelTracer) and tracer.pipeline == pipeline


def test_quirk_flags_are_logged_with_the_originals_defaults_and_the_cpu_profile(compose_cfg) -> None:
    def flags(twin: bool) -> dict:
        cfg = compose_cfg(["method=prada", "data=rarvar"])
        if twin:
            apply_cpu_profile(cfg, {"method", "data"})
        # what MLflow gets (config/prada_flags.json) must be plain JSON
        return json.loads(json.dumps(build(cfg.method, model={}, trainer={}).settings.flags()))

    paper, twin = flags(False), flags(True)
    # the originals: DataProvenanceIAR's Algorithm 3 (no keep-best, init 0.5); PRADA's 1 : 1 class balance
    assert paper["stage1.alg3"]["keep_best"] is False and paper["stage1.alg3"]["init_logit"] == 0.5
    assert paper["prada.balance"] is True and paper["prada.position_groups"] == 1
    # the twin profile's logged departures (reasons in conf/data/rarvar.yaml)
    assert twin["stage1.alg3"] == {
        **paper["stage1.alg3"],
        "rounds_stop_scale": 1,
        "init_logit": 10.0,
        "keep_best": True,
    }
    assert twin["prada.balance"] is True and twin["prada.position_groups"] == 4


def test_real_data_needs_its_root_and_checkpoints(compose_cfg, fake_task: Path, tmp_path: Path) -> None:
    cfg = compose_cfg(["method=prada", "data=rarvar", f"data.root={tmp_path / 'missing'}"])
    assert cfg.model.var.tokenizer_checkpoint == "vae_ch160v4096z32.pth"  # the method picks model=prada_real
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k in BUILD_KEYS}
    with pytest.raises(DataError, match="does not exist"):
        build_rarvar(**kwargs)
    # a real folder without the released checkpoint files: ConfigError naming the model key and the file
    root = _copy(fake_task, tmp_path)
    shutil.rmtree(root / "checkpoints")
    with pytest.raises(ConfigError, match=r"model\.rar\.tokenizer_checkpoint=.*maskgit-vqgan-imagenet-f16-256\.bin"):
        build_rarvar(**{**kwargs, "root": str(root), "image_size": 8})
    bad = compose_cfg(["method=lorax", "data=rarvar"])
    with pytest.raises(ConfigError, match="tracing"):
        check_compatibility(bad)


# ---------------------------------------------------------------------------------------------- flags
def test_encloss_reconstruction_flag_and_combined() -> None:
    tok = FakeTokenizer(seed=1)
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = signals_batch(tok, x, tok.quantize)
    quant = signals_batch(tok, x, tok.quantize, quantized_reconstruction=True)
    # quantised reconstruction: the EncLoss numerator IS the fully quantised reconstruction error
    assert torch.allclose(quant["recon"], quant["qrecon"]) and not torch.allclose(plain["recon"], plain["qrecon"])
    assert torch.allclose(plain["comb"], plain["quant"] * plain["enc"])
    fz = tok.tokens_to_latent(plain["tokens"])
    assert torch.allclose(plain["quant"], (tok.encode_feature(x) - fz).pow(2).flatten(1).mean(1))


def test_median_quantloss_ignores_a_few_unrecovered_tokens() -> None:
    f = torch.zeros(2, 4, 3, 3)
    fz = torch.zeros(2, 4, 3, 3)
    fz[0, :, 0, 0] = 3.0  # one position on a wrong code: a whole code distance
    fz[1] = 0.1  # every position slightly off the codebook (an outlier)
    mean, median = quant_loss_per_sample(f, fz, "mean"), quant_loss_per_sample(f, fz, "median")
    assert mean[0] > mean[1]  # the paper's mean ranks the nearly recovered image as the outlier
    assert median[0] == 0.0 and median[1] == pytest.approx(0.01)  # the median does not
    tok = FakeTokenizer(seed=1)
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = signals_batch(tok, x, tok.quantize, quant_reduce="median")
    assert torch.equal(out["quant"], out["quant_median"]) and torch.allclose(out["comb"], out["quant"] * out["enc"])
    with pytest.raises(ValueError, match="quant_reduce='max'"):
        quant_loss_per_sample(f, fz, "max")


def test_candidate_aggregation_and_augmentation_schedule() -> None:
    x = np.log(np.array([[1.0, 3.0], [2.0, 2.0]]))
    assert logmeanexp(x, axis=1) == pytest.approx(np.log([2.0, 2.0]))
    sf = ScoreFunction([(0, 4)], aggregate="logmeanexp")
    feats = torch.randn(5, 3, 4, 2)
    per = sf.per_candidate(feats)
    assert torch.allclose(sf(feats), torch.logsumexp(per, 1) - np.log(3))
    schedule = [["none", 2], ["weak", 1], ["strong", 2]]
    assert [level_at(e, schedule) for e in range(7)] == ["none", "none", "weak", "strong", "strong", "strong", "strong"]
    img = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    rng = np.random.default_rng(0)
    for _ in range(12):  # every transform keeps shape and range
        out = augment(img, "strong", rng)
        assert out.shape == img.shape and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
