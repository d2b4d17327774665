"""The counterfactual gold standard: retrain without a method's top-K, measure what the query lost.

Delta L(q) = L(q, theta_-K) - L(q, theta_ref) with strided timesteps and noise keyed by (query, t), and
Delta G(q) = MSE between the DDIM samples of theta_ref and theta_-K from the same noise and prompt
("seed consistency"; pixels on the twin, latents on MSCOCO where no VAE is loaded). theta_ref is the coupled
retrain that removes nothing, which is theta0 itself when theta0 was trained by this code (the twin); every
retrain is cached on disk by (data, model, recipe, removed set) so Hydra jobs and resumed runs share them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from genattr.methods.attribution.losses import loss_sweep, strided_timesteps
from genattr.methods.attribution.training import TrainRecipe, train_coupled
from genattr.models.diffusion import DiffusionModel, build_diffusion, ddim_sample
from genattr.utils.errors import DataError

log = logging.getLogger(__name__)


def data_fingerprint(latents: np.ndarray, text: np.ndarray) -> str:
    """A cheap identity of the training set: shapes plus a sample of rows (the arrays can be 186 GB)."""
    h = hashlib.sha256(repr((latents.shape, text.shape)).encode())
    for r in sorted({0, latents.shape[0] // 2, latents.shape[0] - 1}):
        h.update(np.ascontiguousarray(latents[r], dtype=np.float32).tobytes())
    for r in sorted({0, text.shape[0] - 1}):
        h.update(np.ascontiguousarray(text[r, 0, :4], dtype=np.float32).tobytes())
    return h.hexdigest()[:16]


class RetrainCache:
    """Coupled retrains of one (data, model, recipe), stored as ``<key>.safetensors`` under ``folder``.

    The key hashes the data fingerprint, the model config, the training recipe (its seed included) and
    the sorted removed set, so a retrain trained by any process (inline, a Hydra multirun job, an earlier
    run) is found by every evaluation that needs the same removal.
    """

    def __init__(
        self,
        folder: str | Path,
        model_cfg: Mapping[str, Any],
        recipe: TrainRecipe,
        latents: np.ndarray,
        text: np.ndarray,
        accelerator: Accelerator | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.model_cfg = dict(model_cfg)
        self.recipe = recipe
        self.latents, self.text = latents, text
        self.accelerator = accelerator
        self.base = {"data": data_fingerprint(latents, text), "model": self.model_cfg, "recipe": recipe.as_dict()}
        self.trained = 0  # retrains actually run (not read from the cache), for reports

    @property
    def base_hash(self) -> str:
        """Hash of what every retrain of this cache shares (data, model, recipe and its seed)."""
        return hashlib.sha256(json.dumps(self.base, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def key(self, removed: Iterable[int]) -> str:
        blob = json.dumps({**self.base, "removed": sorted(int(i) for i in removed)}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def path(self, removed: Iterable[int]) -> Path:
        return self.folder / f"{self.key(removed)}.safetensors"

    def has(self, removed: Iterable[int]) -> bool:
        return self.path(removed).is_file()

    def model(self, removed: Iterable[int], *, train: bool = True) -> DiffusionModel:
        """theta_-removed, read from the cache, else trained now (``train=False``: a :class:`DataError`)."""
        removed = sorted(int(i) for i in removed)
        path = self.path(removed)
        model = build_diffusion(**self.model_cfg)
        if path.is_file():
            model.unet.load_state_dict(load_file(str(path)))
            return model
        if not train:
            raise DataError(
                f"the retrain {path.stem} (without {len(removed)} images) is not in the retrain cache {self.folder}"
            )
        log.info("coupled retrain without %d images -> %s", len(removed), path.name)
        with torch.random.fork_rng(devices=[]):
            state = train_coupled(
                model, self.latents, self.text, self.recipe, removed=removed, accelerator=self.accelerator
            )
        self.trained += 1
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        os.close(fd)
        meta = {"removed": json.dumps(removed), "base": json.dumps(self.base, sort_keys=True, default=str)}
        save_file(state, tmp, metadata=meta)
        os.replace(tmp, path)  # atomic: two jobs training the same key leave one whole file
        model.unet.load_state_dict(state)
        return model


class QueryProbe:
    """Delta L and Delta G of a set of queries, with noise fixed once for every model compared."""

    def __init__(
        self,
        query_latents: np.ndarray,
        query_text: np.ndarray,
        queries: list[int],
        *,
        time_samples: int,
        ddim_steps: int,
        seed: int,
        num_train_timesteps: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.lat, self.text, self.queries = query_latents, query_text, list(queries)
        self.ts = strided_timesteps(num_train_timesteps, time_samples)
        self.ddim_steps, self.seed, self.device = int(ddim_steps), int(seed), device
        g = torch.Generator().manual_seed(self.seed + 104729)
        self.noise = torch.randn((len(self.queries), *query_latents.shape[1:]), generator=g)
        self.cond = torch.from_numpy(np.asarray(query_text[self.queries, 0], dtype=np.float32))

    def measure(self, model: DiffusionModel) -> tuple[np.ndarray, np.ndarray]:
        """(per-query loss, per-query DDIM sample) of ``model``."""
        model.unet.to(self.device)
        loss = loss_sweep(model, self.lat, self.text, self.queries, self.ts, seed=self.seed, device=self.device)
        sample = ddim_sample(model, self.cond.to(self.device), self.noise.to(self.device), steps=self.ddim_steps)
        return loss, sample.cpu().numpy()


def deltas(ref: tuple[np.ndarray, np.ndarray], new: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(Delta L, Delta G) per query between the reference and a retrain."""
    d_loss = new[0] - ref[0]
    d_gen = ((new[1] - ref[1]) ** 2).reshape(len(d_loss), -1).mean(1)
    return d_loss, d_gen
