"""The retrains of the leave-K-out evaluation, cached on disk by (data, model, recipe, coupling, removed set).

Every retrain is stored as ``<key>.safetensors`` under the cache folder, so that an inline evaluation, the Hydra
jobs of a retrain plan (:mod:`genattr.methods.attribution.retrain_job`) and resumed runs share them. A retrain
trains on every process of a run (DDP through the engine); the main process writes the file.
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

from genattr.engine.training import per_process
from genattr.methods.attribution.training import TrainRecipe, check_coupling, independent_seed, train_unet
from genattr.models.diffusion import DiffusionModel, build_diffusion
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
    """Retrains of one (data, model, recipe, coupling), stored as ``<key>.safetensors`` under ``folder``.

    The key hashes the data fingerprint, the model config, the training recipe (its seed included), the
    coupling, the mixed precision of the training (only when it is not ``no``, so fp32 keys are those of
    earlier genattr versions) and the sorted removed set, so a retrain trained by any process (inline, a
    Hydra multirun job, an earlier run) is found by every evaluation that needs the same removal, and an
    independent (or bf16) retrain is never mistaken for a coupled (or fp32) one.
    """

    def __init__(
        self,
        folder: str | Path,
        model_cfg: Mapping[str, Any],
        recipe: TrainRecipe,
        latents: np.ndarray,
        text: np.ndarray,
        *,
        coupling: str,
        accelerator: Accelerator | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.model_cfg = dict(model_cfg)
        self.recipe = recipe
        self.coupling = check_coupling(coupling)
        self.latents, self.text = latents, text
        self.accelerator = accelerator
        self.base = {
            "data": data_fingerprint(latents, text),
            "model": self.model_cfg,
            "recipe": recipe.as_dict(),
            "coupling": coupling,
        }
        precision = str(accelerator.mixed_precision) if accelerator is not None else "no"
        if precision != "no":
            self.base["mixed_precision"] = precision
        self.trained = 0  # retrains actually run (not read from the cache), for reports

    @property
    def base_hash(self) -> str:
        """Hash of what every retrain of this cache shares (data, model, recipe and its seed, coupling)."""
        return hashlib.sha256(json.dumps(self.base, sort_keys=True, default=str).encode()).hexdigest()[:20]

    def key(self, removed: Iterable[int]) -> str:
        blob = json.dumps({**self.base, "removed": sorted(int(i) for i in removed)}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def path(self, removed: Iterable[int]) -> Path:
        return self.folder / f"{self.key(removed)}.safetensors"

    def has(self, removed: Iterable[int]) -> bool:
        return self.path(removed).is_file()

    def init_cfg(self, removed: Iterable[int]) -> dict[str, Any]:
        """The model config a retrain starts from: theta0's init (coupled) or one seeded by the removal."""
        if self.coupling == "coupled":
            return self.model_cfg
        return {**self.model_cfg, "seed": independent_seed(int(self.model_cfg["seed"]), removed)}

    def model(self, removed: Iterable[int], *, train: bool = True) -> DiffusionModel:
        """theta_-removed, read from the cache, else trained now (``train=False``: a :class:`DataError`)."""
        removed = sorted(int(i) for i in removed)
        path = self.path(removed)
        model = build_diffusion(**self.init_cfg(removed))
        acc = self.accelerator
        # every process of a run must take the same branch: a retrain trains on all of them together
        cached = path.is_file() if acc is None else all(per_process(acc, path.is_file()))
        if cached:
            model.unet.load_state_dict(load_file(str(path)))
            return model
        if not train:
            raise DataError(
                f"the retrain {path.stem} (without {len(removed)} images) is not in the retrain cache {self.folder}"
            )
        log.info("%s retrain without %d images -> %s", self.coupling, len(removed), path.name)
        with torch.random.fork_rng(devices=[]):
            state = train_unet(
                model,
                self.latents,
                self.text,
                self.recipe,
                removed=removed,
                coupling=self.coupling,
                accelerator=acc,
            )
        self.trained += 1
        if acc is None or acc.is_main_process:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
            os.close(fd)
            meta = {"removed": json.dumps(removed), "base": json.dumps(self.base, sort_keys=True, default=str)}
            try:
                save_file(state, tmp, metadata=meta)
                os.replace(tmp, path)  # atomic: two jobs training the same key leave one whole file
            finally:  # a write that fails (a full disk, an interrupt) leaves no partial file in the cache
                Path(tmp).unlink(missing_ok=True)
        if acc is not None:
            acc.wait_for_everyone()
        model.unet.load_state_dict(state)
        return model
