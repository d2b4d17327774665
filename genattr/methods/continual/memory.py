"""iCaRL herding exemplar memory, one global memory for all ranks.

The budget is the *total* number of exemplars: after task t every seen class keeps
``size // n_seen_classes`` of them. Old classes keep the prefix of their herding order;
new classes are herded on (L2-normalised) features of the task that just ended.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from genattr.data.images import ImageListDataset, Sample


def herding_order(features: np.ndarray, m: int, *, max_iter: int = 1000, seed: int = 0) -> np.ndarray:
    """Indices of the ``m`` exemplars chosen by iCaRL herding, best first.

    As in iCaRL / DyTox: greedily pick the sample that moves the running mean of the
    picks toward the class mean, for at most ``max_iter`` iterations; the original then
    fills unpicked ranks in arbitrary order, which we make a seeded shuffle.
    """
    n = len(features)
    m = min(m, n)
    if m <= 0:
        return np.zeros(0, dtype=np.int64)
    d = features.astype(np.float64)
    d = d / (np.linalg.norm(d, axis=1, keepdims=True) + 1e-8)
    mu = d.mean(axis=0)
    rank = np.zeros(n, dtype=np.int64)
    w = mu.copy()
    picked = it = 0
    while picked < m and it < max_iter:
        ind = int(np.argmax(d @ w))
        it += 1
        if rank[ind] == 0:
            picked += 1
            rank[ind] = picked
        w = w + mu - d[ind]
    unfilled = np.flatnonzero(rank == 0)
    rank[unfilled] = n + 1 + np.random.default_rng(seed).permutation(len(unfilled))
    return np.argsort(rank, kind="stable")[:m]


class ExemplarMemory:
    def __init__(self, size: int, *, max_iter: int = 1000, seed: int = 0) -> None:
        self.size = int(size)
        self.max_iter = int(max_iter)
        self.seed = int(seed)
        self.per_class: dict[int, list[Sample]] = {}

    def __len__(self) -> int:
        return sum(len(v) for v in self.per_class.values())

    def update(
        self,
        dataset: ImageListDataset,
        classes: Sequence[int],
        n_seen_classes: int,
        features: Callable[[ImageListDataset], np.ndarray],
    ) -> None:
        """Shrink old classes to the new quota, then herd the new ``classes`` from ``dataset``."""
        if self.size <= 0:
            return
        quota = self.size // n_seen_classes
        for c in self.per_class:
            self.per_class[c] = self.per_class[c][:quota]
        feats = features(dataset)
        for c in classes:
            idx = np.flatnonzero(dataset.labels == c)
            order = herding_order(feats[idx], quota, max_iter=self.max_iter, seed=self.seed * 1000 + c)
            self.per_class[int(c)] = [dataset.samples[int(idx[j])] for j in order]

    def dataset(self, like: ImageListDataset) -> ImageListDataset:
        """The exemplars, with the transform and bad-image policy of ``like`` (the current task's training set)."""
        samples = [s for c in sorted(self.per_class) for s in self.per_class[c]]
        return like.with_samples(samples)

    def counts(self) -> dict[int, int]:
        return {c: len(v) for c, v in sorted(self.per_class.items())}

    def state(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "per_class": {str(c): [[s.path, s.label, s.task] for s in v] for c, v in self.per_class.items()},
        }

    def load(self, state: dict[str, Any]) -> None:
        self.per_class = {
            int(c): [Sample(path=p, label=int(y), task=int(t)) for p, y, t in v] for c, v in state["per_class"].items()
        }
