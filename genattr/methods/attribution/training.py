"""Train a text-to-image UNet from scratch through the engine; the same code trains theta0 and every retrain.

The steps go through :func:`genattr.engine.training.prepared` and :func:`~genattr.engine.training.optimizer_step`
(autocast, ``acc.backward``, gradient accumulation, clipping). One random stream draws each step's global batch
(``trainer.batch_size`` rows); the processes and the accumulation micro-steps split that batch between them,
so the draws never depend on how many processes train.

Leave-K-out retrains come in two couplings (``method.evaluation.coupling``):

* **independent** (the paper's "retrain from scratch", Eq. 1; its retraining code is not released): every
  retrain is its own training run on the kept images only. Its initial weights and its random stream
  (batch order over the kept 2(N-K) rows, captions, timesteps, noise) are seeded by a hash of (seed,
  removed set), so two retrains never share a stream and removing nothing is a fresh model, not theta0.
  An epoch is one pass over the kept rows.
* **coupled** (genattr's variance reduction): one random stream, seeded by ``recipe.seed``, draws for every
  step the rows of the batch (a permutation of all 2N rows per epoch), the captions, the timesteps and the
  noise, whatever is removed; a removed image keeps its place with loss weight 0 and the batch loss is
  the weighted mean. Removing nothing reproduces theta0 bit for bit, so any difference between a retrain
  and theta0 is caused by the removal, not by a different noise draw: at twin sizes a fresh seed alone
  moves the loss as much as any removal (``specs/unlearning.md`` 6.3).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from diffusers.optimization import get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel

from genattr.engine.progress import track
from genattr.engine.training import optimizer_step, prepared
from genattr.models.diffusion import DiffusionModel, ddpm_loss
from genattr.utils.errors import ConfigError

log = logging.getLogger(__name__)

#: how a leave-K-out retrain relates to theta0's training run (see the module docstring)
COUPLINGS = ("independent", "coupled")


@dataclass(frozen=True)
class TrainRecipe:
    """What shapes a trained model; hashed into the twin and retrain cache keys."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    warmup_steps: int = 0
    ema_decay: float = 0.0  # 0 = no weight averaging
    grad_clip: float = 0.0  # 0 = off
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def recipe_from_trainer(trainer: Mapping[str, Any]) -> TrainRecipe:
    """The ``trainer`` group (``conf/trainer/diffusion.yaml``) as a recipe, with a sentence for bad keys."""
    try:
        opt = trainer["optimizer"]
        recipe = TrainRecipe(
            epochs=int(trainer["epochs"]),
            batch_size=int(trainer["batch_size"]),
            lr=float(opt["lr"]),
            weight_decay=float(opt["weight_decay"]),
            warmup_steps=int(trainer["schedule"]["warmup_steps"]),
            ema_decay=float(trainer["ema_decay"]),
            grad_clip=float(trainer["grad_clip"]),
            seed=int(trainer["train_seed"]),
        )
    except (KeyError, TypeError) as err:
        raise ConfigError(
            f"trainer lacks {err} for diffusion training; use trainer=diffusion (conf/trainer/diffusion.yaml)"
        ) from err
    if recipe.epochs < 1 or recipe.batch_size < 1:
        raise ConfigError(
            f"trainer.epochs and trainer.batch_size must be >= 1, got {recipe.epochs}/{recipe.batch_size}"
        )
    return recipe


def gather_text(text: np.ndarray, rows: np.ndarray, captions: np.ndarray) -> torch.Tensor:
    """Text embeddings of (row, caption) pairs from a possibly memory-mapped (N, captions, L, D) array."""
    n = text.shape[0]
    return torch.from_numpy(
        np.stack([np.asarray(text[r % n, c], dtype=np.float32) for r, c in zip(rows, captions, strict=False)])
    )


def check_coupling(coupling: str) -> str:
    """``coupling`` if it is one of :data:`COUPLINGS`, else a :class:`ConfigError` naming the key."""
    if coupling not in COUPLINGS:
        raise ConfigError(f"method.evaluation.coupling={coupling} is unknown; choose one of {list(COUPLINGS)}")
    return coupling


def independent_seed(seed: int, removed: Iterable[int]) -> int:
    """The seed of an independent retrain: a hash of (``seed``, sorted removed set), not ``seed`` itself.

    A retrain that removes nothing therefore draws another stream than the run seeded by ``seed``
    (theta0), and every removed set has a stream of its own; the same removal always gets the same one.
    """
    blob = json.dumps({"seed": int(seed), "removed": sorted(int(i) for i in removed), "coupling": "independent"})
    return int.from_bytes(hashlib.sha256(blob.encode()).digest()[:8], "big") % (2**63 - 1)


def train_coupled(
    model: DiffusionModel,
    latents: np.ndarray,
    text: np.ndarray,
    recipe: TrainRecipe,
    *,
    removed: Iterable[int] = (),
    accelerator: Accelerator | None = None,
    on_log: Callable[[int, float, float], None] | None = None,
    log_every: int = 50,
) -> dict[str, torch.Tensor]:
    """:func:`train_unet` with ``coupling="coupled"``: how theta0 of the twin is trained."""
    return train_unet(
        model,
        latents,
        text,
        recipe,
        removed=removed,
        coupling="coupled",
        accelerator=accelerator,
        on_log=on_log,
        log_every=log_every,
    )


def train_unet(
    model: DiffusionModel,
    latents: np.ndarray,
    text: np.ndarray,
    recipe: TrainRecipe,
    *,
    removed: Iterable[int] = (),
    coupling: str,
    accelerator: Accelerator | None = None,
    on_log: Callable[[int, float, float], None] | None = None,
    log_every: int = 50,
) -> dict[str, torch.Tensor]:
    """Train ``model.unet`` in place on the 2N rows minus ``removed`` images (both flips); return its weights.

    ``coupling`` (one of :data:`COUPLINGS`) decides the random stream and the rows an epoch runs over (see
    the module docstring); the caller builds ``model``, so for an independent retrain it seeds the initial
    weights (``RetrainCache`` uses :func:`independent_seed` of the model's seed). The returned state dict
    (CPU) holds the EMA weights when ``recipe.ema_decay > 0`` (what every downstream step uses) and the
    UNet is left holding them too.
    """
    check_coupling(coupling)
    acc = accelerator or Accelerator(cpu=True)
    n_rows, n = latents.shape[0], text.shape[0]
    keep = np.ones(n, dtype=np.float32)
    removed = np.asarray(sorted({int(i) for i in removed}), dtype=np.int64)
    if len(removed) and (removed.min() < 0 or removed.max() >= n):
        raise ValueError(f"removed indices must lie in [0, {n}), got {removed.min()}..{removed.max()}")
    keep[removed] = 0.0
    if keep.sum() == 0:
        raise ValueError("every training image is removed; nothing to train on")
    if coupling == "coupled":  # every row keeps its place in theta0's stream; removed ones weigh 0
        rows, seed = torch.arange(n_rows), recipe.seed
    else:  # a run of its own over the kept rows
        rows = torch.from_numpy(np.flatnonzero(keep[np.arange(n_rows) % n]))
        seed = independent_seed(recipe.seed, removed.tolist())
    steps_per_epoch = len(rows) // recipe.batch_size
    if steps_per_epoch < 1:
        raise ConfigError(f"trainer.batch_size={recipe.batch_size} exceeds the {len(rows)} training rows")
    rank, world, accum = acc.process_index, acc.num_processes, acc.gradient_accumulation_steps
    if recipe.batch_size % (world * accum):
        raise ConfigError(
            f"trainer.batch_size={recipe.batch_size} must be divisible by processes x trainer.grad_accum = "
            f"{world * accum}: they split each step's batch"
        )
    total = recipe.epochs * steps_per_epoch
    with warnings.catch_warnings():
        # the latents may be a read-only memmap of the cache; they are only read (batches are indexed copies), so
        # sharing its memory is safe and avoids a copy of the whole training set
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        lat = torch.from_numpy(np.asarray(latents, dtype=np.float32))
    unet = model.unet.to(acc.device)  # before the optimiser and the EMA copy take its parameters
    unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    # not prepared: Accelerate would step it once per process, but every process trains on a share of the same
    # global batch, so the schedule advances once per optimiser step
    sched = get_cosine_schedule_with_warmup(opt, recipe.warmup_steps, total)
    ema = EMAModel(unet.parameters(), decay=recipe.ema_decay) if recipe.ema_decay > 0 else None
    device = acc.device
    ac = model.alphas_cumprod.to(device)
    # the stream lives on the CPU so that theta0 and retrains draw the same numbers on any device
    gen = torch.Generator().manual_seed(seed)
    n_caps, T = text.shape[1], model.num_timesteps
    clip = recipe.grad_clip if recipe.grad_clip > 0 else None
    t0, step, running, count = time.perf_counter(), 0, 0.0, 0
    with prepared(acc, unet, opt) as p:
        epochs = track(
            range(recipe.epochs),
            desc=f"{coupling} training ({int(keep.sum())} of {n} images)",
            unit="epoch",
            main_process=acc.is_main_process,
        )
        for _epoch in epochs:
            perm = rows[torch.randperm(len(rows), generator=gen)]
            for s in range(steps_per_epoch):
                idx = perm[s * recipe.batch_size : (s + 1) * recipe.batch_size].numpy()
                t = torch.randint(0, T, (len(idx),), generator=gen)
                eps = torch.randn((len(idx), *lat.shape[1:]), generator=gen)
                caps = torch.randint(0, n_caps, (len(idx),), generator=gen).numpy()
                step_loss = 0.0
                for j in range(accum):  # this process's share of the batch, one slice per micro-step
                    mine = slice(rank + world * j, None, world * accum)
                    w = torch.from_numpy(keep[idx[mine] % n]).to(device)
                    x0 = lat[idx[mine]].to(device)
                    cond = gather_text(text, idx[mine], caps[mine]).to(device)
                    tt, ee = t[mine].to(device), eps[mine].to(device)

                    def weighted(net, x0=x0, cond=cond, tt=tt, ee=ee, w=w) -> torch.Tensor:
                        per = ddpm_loss(net, ac, x0, cond, tt, ee)
                        return (per * w).sum() / w.sum().clamp_min(1.0)

                    loss = optimizer_step(acc, p, weighted, clip_norm=clip)
                    if on_log is not None:
                        step_loss += float(loss) / accum
                sched.step()
                if ema is not None:
                    ema.step(unet.parameters())
                step += 1
                if on_log is not None:
                    running, count = running + step_loss, count + 1
                    if step % log_every == 0 or step == total:
                        on_log(step, running / count, float(sched.get_last_lr()[0]))
                        running, count = 0.0, 0
                if p.capped:  # trainer.max_steps
                    break
            if p.capped:
                break
    if ema is not None:
        ema.copy_to(unet.parameters())
    log.info(
        "trained %d of %d steps (%s, %d of %d images kept) in %.1fs",
        step,
        total,
        coupling,
        int(keep.sum()),
        n,
        time.perf_counter() - t0,
    )
    return {k: v.detach().cpu().clone() for k, v in unet.state_dict().items()}
