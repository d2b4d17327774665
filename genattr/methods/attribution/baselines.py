"""Baseline attribution scores, all (N,) with higher = more responsible, flips scored by max like AbU.

* ``random``: a seeded permutation, the floor every method must clear.
* ``pixel``: cosine similarity of flattened inputs (JourneyTRAK's pixel baseline). On the twin the latents
  are pixels; on real data with ``data.vae`` the decoded images are compared instead
  (:func:`genattr.methods.attribution.features.pixel_embed`), and this latent-space cosine is the fallback.
* ``text``: cosine similarity of token-averaged text embeddings of the model's own text encoder, max over the
  training captions: the fallback (``method.text_baseline=encoder``) of the paper's CLIP ViT-B/32 text
  baseline (:class:`genattr.methods.attribution.features.TextTower`), which needs captions.
* ``influence``: the one-step influence function grad L(z)^T F^-1 grad L(query) on the selected weights
  (AbU's small-step limit, paper App. A.3), with per-sample training gradients from ``torch.func``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from genattr.engine.progress import track
from genattr.methods.attribution.losses import keyed_noise, max_over_flips
from genattr.methods.attribution.training import gather_text
from genattr.methods.attribution.unlearning import per_sample_grads
from genattr.models.diffusion import DiffusionModel


def random_scores(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(int(seed)).permutation(n).astype(np.float64)


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.reshape(x.shape[0], -1).astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def pixel_cosine(query: np.ndarray, latents: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Cosine of the flattened query with every training row (2N), max over the two flips."""
    q = _unit(query[None])[0]
    sims = np.concatenate([_unit(np.asarray(latents[s : s + chunk])) @ q for s in range(0, latents.shape[0], chunk)])
    return max_over_flips(sims)


def text_similarity(query_text: np.ndarray, text: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Cosine of token-averaged embeddings, max over each training image's captions."""
    q = _unit(np.asarray(query_text, dtype=np.float64).reshape(-1, *query_text.shape[-2:]).mean(1))[0]
    out = []
    for s in range(0, text.shape[0], chunk):
        block = np.asarray(text[s : s + chunk], dtype=np.float64)  # (b, captions, L, D)
        pooled = block.mean(2)
        b, c, d = pooled.shape
        out.append((_unit(pooled.reshape(b * c, d)) @ q).reshape(b, c).max(1))
    return np.concatenate(out)


def influence_rows(
    model: DiffusionModel,
    names: Sequence[str],
    directions: Mapping[str, torch.Tensor],
    latents: np.ndarray,
    text: np.ndarray,
    timesteps: Sequence[int],
    rows: Sequence[int],
    *,
    seed: int,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    desc: str | None = None,
    main_process: bool = True,
) -> np.ndarray:
    """grad L(z)^T v for the training ``rows`` z and each direction v = F^-1 grad L(query): (Q, len(rows)).

    ``directions`` maps a parameter name to a (Q, *shape) stack, one preconditioned query gradient per
    query, so one sweep of per-sample gradients serves every query. Training gradients average the
    ``timesteps`` with keyed noise and caption 0, so a row's value does not depend on the other rows.
    """
    v = torch.cat([directions[n].reshape(directions[n].shape[0], -1).double() for n in names], 1).to(device)
    rows = np.asarray(rows, dtype=np.int64)
    pairs = [(k, r, t) for k, r in enumerate(rows) for t in timesteps]
    out = torch.zeros((v.shape[0], len(rows)), dtype=torch.float64)
    starts = range(0, len(pairs), int(batch_size))
    if desc is not None:
        starts = track(starts, desc=desc, unit="batch", main_process=main_process)
    for s in starts:
        chunk = pairs[s : s + batch_size]
        k = np.array([p[0] for p in chunk])
        r = np.array([p[1] for p in chunk])
        t = [p[2] for p in chunk]
        eps = keyed_noise(seed, r, t, latents.shape[1:]).to(device)
        x0 = torch.from_numpy(np.asarray(latents[r], dtype=np.float32)).to(device)
        cond = gather_text(text, r, np.zeros(len(r), dtype=np.int64)).to(device)
        g = per_sample_grads(model, names, x0, cond, torch.tensor(t, device=device), eps)
        flat = torch.cat([g[n].detach().reshape(len(r), -1).double() for n in names], 1)
        out.index_add_(1, torch.from_numpy(k), (v @ flat.T).cpu())
    return (out / len(timesteps)).numpy()


def influence_scores(
    model: DiffusionModel,
    names: Sequence[str],
    directions: Mapping[str, torch.Tensor],
    latents: np.ndarray,
    text: np.ndarray,
    timesteps: Sequence[int],
    *,
    seed: int,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """:func:`influence_rows` of every training row, (Q, N) after the max over flips."""
    raw = influence_rows(
        model,
        names,
        directions,
        latents,
        text,
        timesteps,
        range(latents.shape[0]),
        seed=seed,
        batch_size=batch_size,
        device=device,
    )
    return np.stack([max_over_flips(s) for s in raw])
