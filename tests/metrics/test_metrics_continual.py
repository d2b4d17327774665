"""Continual metrics against hand-computed values (LoRAX definitions)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score

from genattr.metrics.continual import (
    average_incremental_accuracy,
    backward_transfer,
    binary_correct,
    build_accuracy_matrix,
    final_average_accuracy,
    forgetting,
    multi_real_correct,
    per_task_accuracy,
    stage_average_curve,
    summarize,
)

# Forgetting case: every old task loses accuracy.
R_FORGET = np.array(
    [
        [90.0, 80.0, 70.0],
        [0.0, 60.0, 50.0],
        [0.0, 0.0, 40.0],
    ]
)
# Positive backward transfer: old tasks improve.
R_GAIN = np.array(
    [
        [50.0, 60.0, 55.0],
        [0.0, 70.0, 80.0],
        [0.0, 0.0, 90.0],
    ]
)


def test_forgetting_matrix_by_hand() -> None:
    # stage avgs: 90, (80+60)/2 = 70, (70+50+40)/3 = 160/3
    assert stage_average_curve(R_FORGET) == pytest.approx([90.0, 70.0, 53.333333333])
    # AA = (90 + 70 + 53.333...)/3 = 71.111...
    assert average_incremental_accuracy(R_FORGET) == pytest.approx(71.111111111)
    assert final_average_accuracy(R_FORGET) == pytest.approx(53.333333333)
    # BWT = ((70-90) + (50-60))/2 = -15
    assert backward_transfer(R_FORGET) == pytest.approx(-15.0)
    assert forgetting(R_FORGET) == pytest.approx(15.0)


def test_gain_matrix_by_hand() -> None:
    # stage avgs: 50, (60+70)/2 = 65, (55+80+90)/3 = 75
    assert stage_average_curve(R_GAIN) == pytest.approx([50.0, 65.0, 75.0])
    assert average_incremental_accuracy(R_GAIN) == pytest.approx(63.333333333)
    assert final_average_accuracy(R_GAIN) == pytest.approx(75.0)
    # BWT = ((55-50) + (80-70))/2 = 7.5
    assert backward_transfer(R_GAIN) == pytest.approx(7.5)
    assert forgetting(R_GAIN) == pytest.approx(-7.5)


def test_summarize_returns_python_types() -> None:
    s = summarize(R_FORGET)
    assert set(s) == {"aa", "aaf", "bwt", "forgetting", "stage_avg"}
    assert all(type(s[k]) is float for k in ("aa", "aaf", "bwt", "forgetting"))
    assert isinstance(s["stage_avg"], list) and all(type(v) is float for v in s["stage_avg"])


def test_single_task() -> None:
    r = np.array([[42.0]])
    assert summarize(r) == {
        "aa": 42.0,
        "aaf": 42.0,
        "bwt": 0.0,
        "forgetting": 0.0,
        "stage_avg": [42.0],
    }


def test_build_accuracy_matrix_matches_lorax_layout() -> None:
    r = build_accuracy_matrix([[90.0], [80.0, 60.0], [70.0, 50.0, 40.0]])
    np.testing.assert_array_equal(r, R_FORGET)
    with pytest.raises(ValueError, match="stage 1"):
        build_accuracy_matrix([[90.0], [80.0]])
    with pytest.raises(ValueError):
        build_accuracy_matrix([])


@pytest.mark.parametrize(
    "bad",
    [np.zeros((2, 3)), np.zeros(3), np.zeros((2, 2, 2)), np.zeros((0, 0))],
    ids=["non-square", "1d", "3d", "empty"],
)
def test_rejects_malformed_matrix(bad: np.ndarray) -> None:
    for fn in (
        stage_average_curve,
        final_average_accuracy,
        backward_transfer,
        summarize,
    ):
        with pytest.raises(ValueError):
            fn(bad)


def test_rejects_nan_on_seen_cells() -> None:
    r = R_FORGET.copy()
    r[0, 2] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        summarize(r)


# (pred, target, expected) with task i owning real=2i, fake=2i+1
MULTI_REAL_TABLE = [
    (0, 0, True),  # real, exact
    (2, 0, True),  # real of task 0 predicted as real of task 1: allowed
    (4, 2, True),  # real-real confusion across any tasks
    (1, 1, True),  # fake, right generator
    (5, 5, True),
    (3, 1, False),  # fake attributed to the wrong generator
    (1, 3, False),
    (1, 0, False),  # real -> fake
    (3, 2, False),
    (0, 1, False),  # fake -> real
    (2, 3, False),
]


def test_multi_real_truth_table() -> None:
    p, y, expected = (np.array(col) for col in zip(*MULTI_REAL_TABLE, strict=True))
    np.testing.assert_array_equal(multi_real_correct(p, y), expected.astype(bool))
    # The LoRAX one-liner agrees.
    np.testing.assert_array_equal(multi_real_correct(p, y), p * (p % 2) == y * (y % 2))


def test_binary_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, size=500)
    p = rng.integers(0, 10, size=500)
    ours = binary_correct(p, y).mean()
    assert ours == pytest.approx(accuracy_score(y % 2, p % 2))


def test_per_task_accuracy_by_hand() -> None:
    pred = np.array([0, 2, 1, 3, 2, 3, 5, 5])
    target = np.array([0, 0, 1, 1, 2, 3, 4, 5])
    tasks = target // 2
    # task 0: T T T F ; task 1: T T ; task 2: F T
    np.testing.assert_allclose(per_task_accuracy(pred, target, tasks, 3), [75.0, 100.0, 50.0])
    np.testing.assert_allclose(per_task_accuracy(pred, target, tasks, 3, rule="binary"), [100.0, 100.0, 50.0])
    np.testing.assert_allclose(per_task_accuracy(pred, target, tasks, 3, rule="exact"), [50.0, 100.0, 50.0])


def test_per_task_accuracy_errors() -> None:
    p = np.array([0, 1])
    y = np.array([0, 1])
    with pytest.raises(ValueError, match=r"task\(s\) \[1\]"):
        per_task_accuracy(p, y, np.array([0, 0]), 2)
    with pytest.raises(ValueError):
        per_task_accuracy(p, np.array([0, 1, 2]), np.array([0, 0]), 1)
    with pytest.raises(ValueError):
        per_task_accuracy(p, y, np.array([0, 0, 0]), 1)
    with pytest.raises(ValueError):
        per_task_accuracy(p, y, np.array([0, 3]), 2)
    with pytest.raises(ValueError, match="unknown accuracy rule"):
        per_task_accuracy(p, y, np.array([0, 0]), 1, rule="top5")  # type: ignore[arg-type]
