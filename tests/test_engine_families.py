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
}


@pytest.mark.parametrize("family", sorted(SMALL))
def test_training_goes_through_accelerate_and_bf16_runs_in_bf16(family: str, tmp_path: Path) -> None:
    ov = [*SMALL[family], "trainer.mixed_precision=bf16", "tracking=none"]
    with accelerate_guard() as guard:
        report = run(compose_config(ov, tmp_path / "run"), overrides=ov)
    assert report.completed
    assert guard.backwards > 0 and guard.steps > 0
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
