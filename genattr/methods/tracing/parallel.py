"""How the model tracer shares its work among processes (``torchrun`` / SLURM tasks), with the one-process maths.

Three patterns, each chosen so that N processes compute what one process computes:

* sweeps that only read a model (Stage 1 signals, Stage 2 / PRADA likelihood features, top-k classes) go over
  whole *batches*: the batches of the one-process sweep are split among the processes (:func:`batch_share`) and
  the rows gathered back in order (:func:`sweep`). A batch is the same tensor on any process, so the rows are
  the same bits as one process's, whatever the kernels do with the batch dimension;
* mini-batch trainings of one model (inverse decoders, class classifier) keep the one-process global batch and
  give each process a share of its rows; DDP averages the gradients, so each process's loss is its share of the
  global batch's mean (:func:`global_batch_mean`): the same gradient up to the order of float sums;
* independent fits (the eight score functions) run whole, one per process, prepared for this process alone
  (:func:`genattr.engine.training.prepared_alone`), and are gathered: each is the one-process fit, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from accelerate import Accelerator

from genattr.engine.progress import track
from genattr.engine.training import per_process, shard


def batch_share(acc: Accelerator, n: int, batch_size: int) -> range:
    """This process's rows of an ``n``-row sweep in batches of ``batch_size``: a contiguous run of whole batches."""
    batches = shard(acc, -(-n // batch_size))
    return range(min(batches.start * batch_size, n), min(batches.stop * batch_size, n))


def sweep(
    acc: Accelerator,
    n: int,
    batch_size: int,
    fn: Callable[[slice], Mapping[str, np.ndarray]],
    *,
    desc: str,
) -> tuple[dict[str, np.ndarray], int]:
    """``fn(rows)`` for every batch of this process's :func:`batch_share`, each output concatenated over all
    ``n`` rows in order on every process; also the number of rows this process computed."""
    rows = batch_share(acc, n, batch_size)
    parts: dict[str, list[np.ndarray]] = {}
    starts = range(rows.start, rows.stop, batch_size)
    for s in track(starts, desc=desc, unit="batch", main_process=acc.is_main_process):
        for k, v in fn(slice(s, min(s + batch_size, rows.stop))).items():
            parts.setdefault(k, []).append(v)
    local = {k: np.concatenate(v) for k, v in parts.items()}
    # one gather for every output; a process without a batch (fewer batches than processes) sends nothing
    pieces = [p for p in per_process(acc, local) if p]
    out = {k: np.concatenate([p[k] for p in pieces]) for k in (pieces[0] if pieces else {})}
    if any(len(v) != n for v in out.values()):
        raise RuntimeError(f"{desc}: gathered {[len(v) for v in out.values()]} rows, expected {n}")
    return out, len(rows)


def global_batch_mean(per_sample: torch.Tensor, batch: int, world: int) -> torch.Tensor:
    """This process's share of the mean loss of a global batch of ``batch`` rows: DDP averages the processes'
    gradients, so each weights its rows by ``world / batch`` (shares of unequal size included). One process keeps
    the plain mean (the same bits as before the engine)."""
    if world == 1:
        return per_sample.mean()
    return per_sample.sum() * (world / batch)
