"""Every family on the one engine: trains only through Accelerate (bf16 really bf16), and runs data-parallel
under ``torchrun --standalone --nproc_per_node 2`` (CPU, gloo) with one results.json and one MLflow run.

Each family adds its case to the two tables below: the overrides of a small twin run, and what its
``results.json`` says each process did.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config
from helpers.accelerate_guard import accelerate_guard
from helpers.distributed import check_one_run_of, launch

from genattr.run import run

pytestmark = pytest.mark.slow

#: a small twin run of each family, without random draws in training (LoRA dropout 0, 32 px images under the
#: 32 px crop), so the 2-process maths is the 1-process maths
SMALL: dict[str, list[str]] = {
    # GS-LoRA on two of the face twin's forgetting tasks, two epochs each (44 and 36 steps of a remaining batch
    # with a forgotten one beside it, mid-task evaluations every 20 steps); the face ViT keeps its dropout 0.1
    # here, so the cached twin backbone of the e2e tests is the one it starts from (the torchrun test sets it to 0)
    "forgetting": [
        "method=gslora",
        "data=casia100",
        "data.scenario.num_tasks=2",
        "trainer.epochs=2",
    ],
    "continual": [
        "method=lorax",
        "data=cddb_hard",
        "data.tasks=[gaugan,biggan]",
        "data.twin.n_train=32",
        "data.twin.n_val=16",
        "data.twin.image_size=32",
        "trainer.epochs=2",
        "method.lora.lora_dropout=0.0",
    ],
    # the model tracer's one-step PRADA on the cached rarvar twin with all three of its trainings (inverse
    # decoders for prada.tokens=stage1, the top-k class classifier, the eight score functions), kept short
    "tracing": [
        "method=prada",
        "data=rarvar",
        "method.pipeline=one_step",
        "method.class_source=topk",
        "method.prada.tokens=stage1",
        "method.pairs.per_variant=8",
        "method.pairs.batch_size=8",
        "method.inverse.var.epochs=2",
        "method.inverse.rar.epochs=2",
        "method.classifier.epochs=2",
        "method.prada.epochs=5",
        "method.prada.generated_per_variant=4",
        "method.batch_size=16",
    ],
    # the AI-GenBench detector on two windows: a probe (frozen BatchNorm backbone, so no running statistics that
    # each process would update with its own batches), 8 images per micro-batch towards the global batch of 32,
    # 4 validation images per scoring batch (so the scoring is sharded too)
    "detection": [
        "method=detector",
        "data=aigenbench",
        "data.twin.n_windows=2",
        "data.twin.n_train=16",
        "data.twin.n_val=12",
        "model.name=test_resnet_probe",
        "trainer.batch_size=8",
        "trainer.eval_batch_size=4",
    ],
    # AbU on a 2-epoch MSCOCO twin: the Fisher, the loss sweeps and the influence sweep of one query, then its
    # leave-K-out evaluation with three coupled retrains (reference, one random-4, AbU's top-4) trained in the
    # run's own cache folder, so that every run trains them (a cached retrain would train nothing)
    "attribution": [
        "method=unlearn",
        "data=mscoco",
        "trainer.epochs=2",
        "method.baselines=[random,pixel,influence]",
        "method.queries=[0]",
        "method.evaluation.enabled=true",
        "method.evaluation.methods=[unlearn]",
        "method.evaluation.ks=[4]",
        "method.evaluation.random_seeds=1",
        "method.evaluation.oracle=false",
        "method.evaluation.loss_time_samples=10",
        "method.evaluation.regen.steps=10",
        "method.cache_dir=${paths.output_dir}/cache",
    ],
}


@pytest.mark.parametrize("family", sorted(SMALL))
def test_training_goes_through_accelerate_and_bf16_runs_in_bf16(family: str, tmp_path: Path) -> None:
    ov = [*SMALL[family], "trainer.mixed_precision=bf16", "tracking=none"]
    with accelerate_guard() as guard:
        report = run(compose_config(ov, tmp_path / "run"), overrides=ov)
    assert report.completed
    assert guard.stages > 0 and guard.backwards > 0 and guard.steps > 0
    assert guard.train_dtypes and set(guard.train_dtypes) == {torch.bfloat16}, set(guard.train_dtypes)


def test_continual_runs_sharded_on_two_processes_with_the_one_process_maths(tmp_path: Path) -> None:
    one = launch(SMALL["continual"], tmp_path / "one", nproc=1)
    two = launch(SMALL["continual"], tmp_path / "two", nproc=2)
    check_one_run_of(one, 1)
    check_one_run_of(two, 2)
    seen_one, seen_two = one.results["per_process"]["train_samples"], two.results["per_process"]["train_samples"]
    assert len(seen_one) == 1 and len(seen_two) == 2
    assert seen_two[0] == seen_two[1] and sum(seen_two) == seen_one[0]  # each process trained on half
    # same global batch, same samples per step, gradients averaged over the processes: only float rounding
    # (the all-reduce sums in another order) separates the two runs' accuracies
    print("acc matrices, 1 vs 2 processes:", one.results["acc_matrix"], two.results["acc_matrix"])
    np.testing.assert_allclose(two.results["acc_matrix"], one.results["acc_matrix"], atol=3.2)  # one image of 32


def test_detection_runs_sharded_on_two_processes_with_the_one_process_maths(tmp_path: Path) -> None:
    one = launch(SMALL["detection"], tmp_path / "one", nproc=1)
    two = launch(SMALL["detection"], tmp_path / "two", nproc=2)
    check_one_run_of(one, 1)
    check_one_run_of(two, 2)
    assert (one.results["accumulation_steps"], two.results["accumulation_steps"]) == (4, 2)  # global batch 32
    trained_one, trained_two = one.results["per_process"]["train_samples"], two.results["per_process"]["train_samples"]
    assert len(trained_one) == 1 and trained_two[0] == trained_two[1] and sum(trained_two) == trained_one[0]
    scored_one, scored_two = one.results["per_process"]["scored_images"], two.results["per_process"]["scored_images"]
    assert max(scored_two) < scored_one[0] <= sum(scored_two)  # each scored its share (plus even-batch padding)
    steps = [[w["optimizer_steps"] for w in r.results["per_window"]] for r in (one, two)]
    assert steps[0] == steps[1]
    # Why the numbers must match: the twin's augmentation is drawn per image, never per process (the fixed
    # variants from (copy, position), rot90 / flip from (seed, window, dataset index)); the shuffle generator is
    # seeded per window and Accelerate hands process r the micro-batches r, r + 2, ... of that one order, so each
    # optimizer step sees the same 32 images as the 1-process run, whose 4 micro-batches of 8 the two processes
    # split 2 + 2; the loss is divided by the accumulation count and DDP averages over the processes, so the
    # gradient is the same mean; the frozen backbone has no statistics to drift apart. Only float rounding (the
    # all-reduce adds the halves in another order) separates the runs: the losses agree to float32 precision and
    # the scores keep their order (AUROC is a rank statistic).
    print("1 vs 2 processes:", one.results["next_auroc"], two.results["next_auroc"])
    for key in ("next_auroc", "growing_auroc", "whole_auroc"):
        np.testing.assert_allclose(two.results[key], one.results[key], atol=1e-3, err_msg=key)
    losses = [[w["train_loss"] for w in r.results["per_window"]] for r in (one, two)]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)


def test_tracing_runs_sharded_on_two_processes_with_the_one_process_maths(tmp_path: Path) -> None:
    # PRADA's own c2i setting (the class known, the original encoder's tokens): nothing trains but the score functions
    exact = [o for o in SMALL["tracing"] if not o.startswith(("method.class_source=", "method.prada.tokens="))]
    exact += ["method.class_source=oracle", "method.prada.tokens=greedy_original"]
    one = launch(exact, tmp_path / "one", nproc=1)
    two = launch(exact, tmp_path / "two", nproc=2)
    check_one_run_of(one, 1)
    check_one_run_of(two, 2)
    for key in ("samples", "feature_rows", "score_functions"):  # fresh samples, PRADA features, the 8 fits
        mine_one, mine_two = one.results["per_process"][key], two.results["per_process"][key]
        assert len(mine_one) == 1 and len(mine_two) == 2 and min(mine_two) > 0, (key, mine_two)
        assert sum(mine_two) == mine_one[0], (key, mine_one, mine_two)
    assert two.results["per_process"]["score_functions"] == [4, 4]
    print("per process, 1 vs 2 processes:", one.results["per_process"], two.results["per_process"])
    # Why the numbers must be equal, not merely close: every chunk of fresh samples draws from its own seed (seed,
    # variant, chunk), so the two processes make the very images one process makes; the feature sweeps hand each
    # process whole batches of the one-process sweep, so every batch is the same tensor computed by the same
    # kernels; each score function is fitted whole, full batch, on one process from the same seed, i.e. it IS the
    # one-process fit. No float sum changes order anywhere, so predictions and every figure are identical.
    for key in ("val", "test", "val_confusion", "test_confusion", "diagnostics"):
        assert two.results[key] == one.results[key], key
    assert two.results["stage_details"]["prada"] == one.results["stage_details"]["prada"]
    assert (two.folder / "submission.csv").read_text() == (one.folder / "submission.csv").read_text()

    # the trainings under DDP: each process trains on its share of every global batch (inverse decoders,
    # classifier); the gradients are the same means up to float rounding and the classifier's BatchNorm statistics
    # are per share, so only the shares are asserted here (1 process: tests above and
    # tests/methods/test_prada_pipeline.py)
    ddp = launch(SMALL["tracing"], tmp_path / "ddp", nproc=2)
    check_one_run_of(ddp, 2)
    shares = ddp.results["per_process"]
    print("per process, trainings under DDP:", shares)
    pairs = 8 * 4 * 2  # per_variant x variants x families
    held = ddp.results["stage_details"]["inverse"]
    trained = sum(2 * (held[f]["pairs"] - held[f]["heldout"]) for f in ("rar", "var"))  # 2 epochs
    assert sum(shares["inverse_rows"]) == trained and min(shares["inverse_rows"]) > 0, shares
    assert sum(shares["classifier_rows"]) == 2 * pairs and min(shares["classifier_rows"]) > 0, shares
    assert sum(shares["classified_images"]) > 0 and min(shares["classified_images"]) > 0, shares


def test_attribution_runs_sharded_on_two_processes_with_the_one_process_maths(tmp_path: Path) -> None:
    one = launch(SMALL["attribution"], tmp_path / "one", nproc=1)
    two = launch(SMALL["attribution"], tmp_path / "two", nproc=2)
    check_one_run_of(one, 1)
    check_one_run_of(two, 2)
    mine_one, mine_two = one.results["per_process"], two.results["per_process"]
    rows = 2 * 64  # the twin's 64 images, both flips
    assert mine_one["loss_rows"] == [2 * rows] and mine_two["loss_rows"] == [rows, rows]  # 2 sweeps, half each
    assert mine_one["influence_rows"] == [rows] and mine_two["influence_rows"] == [rows // 2, rows // 2]
    assert sum(mine_two["fisher_samples"]) == mine_one["fisher_samples"][0] and min(mine_two["fisher_samples"]) > 0
    assert sum(mine_two["regenerated_queries"]) == mine_one["regenerated_queries"][0]  # the query, per model
    # Why the sweeps must be equal bit for bit: a row's noise is keyed by (seed, row, caption, t) and every UNet
    # forward has the one shape losses.SWEEP_MICRO_BATCH, so a row's loss is the same number whichever process and
    # batch it lands in. tau = after - before then differs only if the unlearned weights do: every process
    # computes each Fisher batch exactly as one process does, but the float64 sums are added in another order
    # (the last bits may differ, ~1e-16 relative), and the step is then rounded to float32 weights, which such
    # a difference flips only in rare elements; so tau agrees to far below its own spread (allclose, not equal).
    before = [np.load(r.folder / "state" / "pretrain_loss.npy") for r in (one, two)]
    assert np.array_equal(before[0], before[1])
    tau = [np.load(r.folder / "scores" / "query_0000.npz")["tau"] for r in (one, two)]
    np.testing.assert_allclose(tau[1], tau[0], rtol=1e-5, atol=1e-9)
    base = [np.load(r.folder / "state" / "baselines.npz") for r in (one, two)]
    for key in ("random", "pixel"):
        assert np.array_equal(base[0][key], base[1][key]), key
    np.testing.assert_allclose(base[1]["influence"], base[0]["influence"], rtol=1e-6)  # per-sample grads, sharded
    # the retrains train under DDP (each process half of every global batch, gradients averaged): the same
    # maths up to float rounding, so only that the evaluation completed is asserted here
    assert set(two.results["leave_k_out"]["jobs"]) == {"reference|None|0", "random|0|4", "unlearn|0|4"}
    assert two.results["leave_k_out"]["retrains_run"] == 3


def test_forgetting_runs_sharded_on_two_processes_with_the_one_process_maths(tmp_path: Path) -> None:
    # no dropout: the face ViT's 0.1 draws its masks on each process for its own rows (the twin backbone of this
    # architecture is trained once into the test cache, on an RNG of its own)
    overrides = [*SMALL["forgetting"], "model.dropout=0.0", "model.emb_dropout=0.0"]
    one = launch(overrides, tmp_path / "one", nproc=1)
    two = launch(overrides, tmp_path / "two", nproc=2)
    check_one_run_of(one, 1)
    check_one_run_of(two, 2)
    seen_one, seen_two = one.results["per_process"]["train_samples"], two.results["per_process"]["train_samples"]
    assert len(seen_one) == 1 and len(seen_two) == 2
    assert seen_two[0] == seen_two[1] and sum(seen_two) == seen_one[0]  # each process trained on half of each batch
    rows_one, rows_two = one.results["tasks"], two.results["tasks"]
    assert [r["name"] for r in rows_two] == [r["name"] for r in rows_one] == ["20-3", "17-3"]
    # Exactly equal: the evaluations before any training. The pre-trained model and task 0's start model are the
    # same network on both runs, each process scores its share of the test split and the per-class counts
    # (integers) are added up.
    for key in ("acc_f_pretrain", "acc_r_pretrain"):
        assert [r[key] for r in rows_two] == [r[key] for r in rows_one], key
    assert (rows_two[0]["acc_f_start"], rows_two[0]["acc_r_start"]) == (
        rows_one[0]["acc_f_start"],
        rows_one[0]["acc_r_start"],
    )
    # Equal up to float rounding: the training. Both runs draw the same global batches (same generators, the
    # twin has no augmentation, GS-LoRA no relabel draw, dropout 0), each process takes an equal half of the
    # remaining and of the forgotten batch (every batch size is even here), DDP averages the two gradients: the
    # mean CE of the halves is the batch's CE, the bounded forgetting term is linear while CE_f < BND, and the
    # group-lasso term reads the same LoRA factors on both. Only the order of float sums (batches of 8 instead
    # of 16, the all-reduce) differs: the losses and group norms agree to ~1e-5, the accuracies to an image.
    print("1 vs 2 processes, H per task:", [r["h"] for r in rows_one], [r["h"] for r in rows_two])
    for key in ("loss_ce_r", "loss_forget", "loss_structure"):
        np.testing.assert_allclose([r[key] for r in rows_two], [r[key] for r in rows_one], rtol=1e-3, err_msg=key)
    np.testing.assert_allclose(
        [r["group_norms"] for r in rows_two], [r["group_norms"] for r in rows_one], rtol=1e-3, err_msg="group_norms"
    )
    for key in ("acc_f_last", "acc_r_last"):  # one forgotten test image is 1.7 points
        np.testing.assert_allclose([r[key] for r in rows_two], [r[key] for r in rows_one], atol=2.0, err_msg=key)
