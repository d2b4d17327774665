"""Which rows train in which window, and which reals are scored with which generator.

Both rules are fixed by the benchmark's datamodule (``training_and_evaluation/
lightning_data_modules/deepfake_detection_datamodule.py`` in MI-BioLab/AI-GenBench, with
the balanced-split fix of 367b44c; ``specs/aigenbench.md`` 1.2, 3), seeds included. Orders
matter as much as memberships: the position of an image in these lists seeds its fixed
augmentation (4321 + position), so every list keeps the original's order.

* training: window k's own rows are as many reals as it has fakes, drawn without
  replacement across windows with ``random.seed(1337 + k)`` from the sorted pool of unused
  reals (kept in ``random.sample`` order), followed by its fakes in row order;
* validation: reals first, then fakes, each side subsampled only when it is the larger
  one (seed 1338); that list is shuffled like ``datasets.Dataset.shuffle(seed=1340)``,
  the real positions are shuffled with ``random.seed(1341)`` and zipped one-to-one with
  the fake positions, so every real image is "paired" with one generator. A window or
  generator subset is its fakes plus the reals paired with them.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence

import numpy as np

from genattr.utils.errors import DataError

TRAIN_REAL_SEED = 1337
VAL_BALANCE_SEED = 1338
VAL_SHUFFLE_SEED = 1340
VAL_PAIRING_SEED = 1341


def allot_training_rows(
    generator_ids: np.ndarray,
    window_ids: Sequence[Collection[int]],
    *,
    seed: int = TRAIN_REAL_SEED,
    split: str = "train",
) -> list[np.ndarray]:
    """Per window: as many fresh reals as it has fakes (in draw order), then its fakes (row order).

    ``generator_ids`` holds one id per row (0 = real); ``window_ids[k]`` the generator
    ids of window k. Reals already given to an earlier window are never drawn again.
    """
    rows = np.arange(len(generator_ids))
    available = set(rows[generator_ids == 0].tolist())
    out: list[np.ndarray] = []
    for k, ids in enumerate(window_ids):
        fakes = rows[np.isin(generator_ids, list(ids))]
        if len(fakes) > len(available):
            raise DataError(
                f"{split}: window {k} needs {len(fakes)} real images but only {len(available)} unused reals "
                "are left; the split must hold at least as many reals as fakes"
            )
        reals = random.Random(seed + k).sample(sorted(available), len(fakes))
        available.difference_update(reals)
        out.append(np.concatenate([np.asarray(reals, dtype=rows.dtype), fakes]))
    return out


def select_validation(generator_ids: np.ndarray, *, seed: int = VAL_BALANCE_SEED) -> np.ndarray:
    """Rows of the real/fake-balanced validation split, reals first, in the original's order.

    Balanced splits (v1.0.0) keep every row: all reals, then all fakes, each in row order.
    Otherwise the larger side is subsampled: reals by ``random.sample`` (seed 1338, draw
    order kept), fakes by scikit-learn's stratified ``train_test_split(random_state=1338)``
    (its order kept), exactly as the original datamodule does.
    """
    rows = np.arange(len(generator_ids))
    reals, fakes = rows[generator_ids == 0], rows[generator_ids != 0]
    if len(reals) > len(fakes):
        reals = np.asarray(random.Random(seed).sample(reals.tolist(), len(fakes)), dtype=rows.dtype)
    elif len(fakes) > len(reals):
        try:
            from sklearn.model_selection import train_test_split
        except ImportError as err:  # only unbalanced splits need it; v1.0.0 is balanced
            raise DataError(
                f"the validation split has more fakes ({len(fakes)}) than reals ({len(reals)}); subsampling the "
                "fakes as the benchmark does needs scikit-learn (pip install scikit-learn)"
            ) from err
        kept, _ = train_test_split(
            fakes.tolist(), train_size=len(reals), stratify=generator_ids[fakes].tolist(), random_state=seed
        )
        fakes = np.asarray(kept, dtype=rows.dtype)
    return np.concatenate([reals, fakes])


def shuffled_order(n: int, seed: int = VAL_SHUFFLE_SEED) -> np.ndarray:
    """The permutation ``datasets.Dataset.shuffle(seed=seed)`` applies to ``n`` rows."""
    return np.random.default_rng(seed).permutation(n)


def pair_reals(generator_ids_in_order: np.ndarray, *, seed: int = VAL_PAIRING_SEED) -> np.ndarray:
    """For rows in evaluation order: the generator id a real is paired with, -1 for fakes.

    Reals left over when there are more reals than fakes get 0 (paired with nothing).
    """
    positions = np.arange(len(generator_ids_in_order))
    reals = positions[generator_ids_in_order == 0].tolist()
    fakes = positions[generator_ids_in_order != 0]
    random.Random(seed).shuffle(reals)
    pairing = np.full(len(positions), -1, dtype=np.int64)
    pairing[reals] = 0
    for real, fake in zip(reals, fakes, strict=False):
        pairing[real] = generator_ids_in_order[fake]
    return pairing


def subset_mask(generator_ids: np.ndarray, pairing: np.ndarray, ids: Collection[int]) -> np.ndarray:
    """Rows scored for a set of generators: their fakes and the reals paired with them."""
    wanted = np.asarray(sorted(ids))
    fake = np.isin(generator_ids, wanted) & (generator_ids != 0)
    real = (generator_ids == 0) & np.isin(pairing, wanted)
    return fake | real
