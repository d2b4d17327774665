"""AbU's sweeps over all training rows (loss sweeps, Fisher, influence, image features), shared by the processes.

Each sweep is data-parallel: a process takes its contiguous share of the rows (or, for the Fisher, of each
pass's batches) with :func:`genattr.engine.training.shard`, and the pieces come back in row order on every
process with :func:`~genattr.engine.training.gather_rows`. The loss vector is bit-identical for any process
count, as it is for any batch size: a row's noise is keyed by (seed, row, caption, t) and every UNet forward has
the one shape :data:`~genattr.methods.attribution.losses.SWEEP_MICRO_BATCH`, so a row's loss does not depend on
which rows share its process. The Fisher is a sum: every process draws the same random stream, computes its
share of the batches exactly as one process would, and the float64 sums are added across processes (in another
order than one process adds them: the last float64 bits may differ). :class:`Sweeps` also counts what this
process swept, for ``results.json`` (``per_process``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from accelerate import Accelerator

from genattr.engine.training import gather_rows, shard
from genattr.methods.attribution.baselines import influence_rows
from genattr.methods.attribution.features import image_similarities
from genattr.methods.attribution.losses import loss_sweep, max_over_flips
from genattr.methods.attribution.unlearning import fisher_sums
from genattr.models.diffusion import DiffusionModel


class Sweeps:
    """The sharded sweeps of one run over the training rows ``latents`` (2N) and ``text`` (N)."""

    def __init__(self, acc: Accelerator, latents: np.ndarray, text: np.ndarray) -> None:
        self.acc = acc
        self.latents, self.text = latents, text
        self.n_rows = latents.shape[0]
        self.rows = shard(acc, self.n_rows)  # this process's training rows
        #: what this process computed in this session: loss-sweep rows, Fisher samples, influence rows
        self.counts = {"loss_rows": 0, "fisher_samples": 0, "influence_rows": 0}

    def losses(
        self,
        model: DiffusionModel,
        timesteps: Sequence[int],
        *,
        seed: int,
        batch_size: int,
        caption_noise: str,
        desc: str,
    ) -> np.ndarray:
        """The (2N,) mean loss of every training row (:func:`~genattr.methods.attribution.losses.loss_sweep`)."""
        mine = loss_sweep(
            model,
            self.latents,
            self.text,
            self.rows,
            timesteps,
            seed=seed,
            batch_size=batch_size,
            caption_noise=caption_noise,
            device=self.acc.device,
            desc=desc,
            main_process=self.acc.is_main_process,
        )
        self.counts["loss_rows"] += len(self.rows)
        return gather_rows(self.acc, mine, self.n_rows)

    def fisher(
        self, model: DiffusionModel, names: Sequence[str], *, epochs: int, batch_size: int, seed: int
    ) -> dict[str, torch.Tensor]:
        """The diagonal Fisher E[g^2] (float64, CPU) of the selected weights, its batches shared out."""
        total, count = fisher_sums(
            model,
            self.latents,
            self.text,
            names,
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            device=self.acc.device,
            share=lambda n: shard(self.acc, n),
            desc="Fisher pass",
            main_process=self.acc.is_main_process,
        )
        self.counts["fisher_samples"] += count
        if self.acc.num_processes > 1:
            total = {n: self.acc.reduce(v, reduction="sum") for n, v in total.items()}
            count = int(self.acc.reduce(torch.tensor(count, device=self.acc.device), reduction="sum"))
        return {n: (v / count).detach().cpu() for n, v in total.items()}

    def influence(
        self,
        model: DiffusionModel,
        names: Sequence[str],
        directions: Mapping[str, torch.Tensor],
        timesteps: Sequence[int],
        *,
        seed: int,
        batch_size: int,
    ) -> np.ndarray:
        """The (Q, N) one-step influence scores (max over flips) of the (Q, ...) ``directions``."""
        mine = influence_rows(
            model,
            names,
            directions,
            self.latents,
            self.text,
            timesteps,
            self.rows,
            seed=seed,
            batch_size=batch_size,
            device=self.acc.device,
            desc="influence sweep",
            main_process=self.acc.is_main_process,
        )
        self.counts["influence_rows"] += len(self.rows)
        full = gather_rows(self.acc, mine.T, self.n_rows).T
        return np.stack([max_over_flips(s) for s in full])

    def image_features(
        self,
        embedders: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
        query_images: torch.Tensor,
        train_images: Callable[[int, int], torch.Tensor],
    ) -> dict[str, np.ndarray]:
        """Per embedder, the (Q, N) feature cosines of the queries with every training row (max over flips)."""
        mine = image_similarities(embedders, query_images, train_images, self.rows)
        full = {k: gather_rows(self.acc, v.T, self.n_rows).T for k, v in mine.items()}
        return {k: np.stack([max_over_flips(r) for r in v]) for k, v in full.items()}
