"""Which rows train in which window, and which reals are scored with which generator.

Both rules are fixed by the benchmark (``specs/aigenbench.md`` 1.2, 3), with its seeds:

* training reals: window k gets as many reals as it has fakes, drawn without replacement
  across windows with ``random.seed(1337 + k)`` from the sorted pool of unused reals;
* validation: the balanced split is shuffled like ``datasets.Dataset.shuffle(seed=1340)``,
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
    """Per window: its fakes plus the same number of fresh reals (row indices, sorted).

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
        out.append(np.sort(np.concatenate([fakes, np.asarray(reals, dtype=fakes.dtype)])))
    return out


def balance_validation(generator_ids: np.ndarray, *, seed: int = VAL_BALANCE_SEED) -> np.ndarray:
    """Rows of a real/fake-balanced validation split (all rows when already balanced).

    The larger side is subsampled: reals uniformly, fakes stratified by generator.
    """
    rows = np.arange(len(generator_ids))
    reals, fakes = rows[generator_ids == 0], rows[generator_ids != 0]
    if len(reals) == len(fakes):
        return rows
    rng = random.Random(seed)
    if len(reals) > len(fakes):
        reals = np.sort(np.asarray(rng.sample(reals.tolist(), len(fakes)), dtype=rows.dtype))
    else:
        keep = []
        gens, counts = np.unique(generator_ids[fakes], return_counts=True)
        quota = np.floor(counts * len(reals) / len(fakes)).astype(int)
        quota[: len(reals) - quota.sum()] += 1  # hand out the remainder, lowest ids first
        for g, q in zip(gens, quota, strict=True):
            keep += rng.sample(fakes[generator_ids[fakes] == g].tolist(), int(q))
        fakes = np.sort(np.asarray(keep, dtype=rows.dtype))
    return np.sort(np.concatenate([reals, fakes]))


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
