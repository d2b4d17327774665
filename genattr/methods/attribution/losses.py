"""Loss sweeps over training images with noise keyed by (image row, caption, timestep), at one fixed forward shape.

AbU's score is the *difference* of two sweeps (after unlearning minus before), so both must see the same
(t, eps) for every image. The original keys the noise by batch id, which silently turns the score into noise
when the batch size, subset, order or device changes (``specs/unlearning.md`` section 7). Here every eps is
drawn from its own CPU generator seeded by (seed, row, caption, t): one independent draw per (row, caption,
t) as the original's ``collect_loss`` draws (``caption_noise: independent``), or, as an opt-in flag, one draw
per (row, t) shared by all captions (``caption_noise: shared``). Caption 0 keeps the (row, t) key in both
modes, so a single-caption data set gives the same numbers either way. Every UNet forward runs on exactly
:data:`SWEEP_MICRO_BATCH` (row, caption, t) jobs, in the order of the job list, the last one padded. float32
kernels choose their blocking (and so their rounding) by the batch shape; with one shape for every call, the
sweep is the same sequence of identical forward calls whatever ``batch_size`` the user picks, so the loss
vector is the same bit for bit. ``batch_size`` only sets how many jobs are prepared (noise drawn, latents
gathered, moved to the device) at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from genattr.engine.progress import track
from genattr.methods.attribution.training import gather_text
from genattr.models.diffusion import DiffusionModel, ddpm_loss
from genattr.utils.errors import ConfigError

_ROW_STRIDE = 1_000_003  # prime, > _CAPTION_STRIDE * captions: distinct (seed, row, caption, t) give distinct keys
_CAPTION_STRIDE = 4096  # > any timestep count
#: how loss-sweep noise relates across an image's captions: one draw per (row, caption, t) (the original) or
#: one per (row, t) reused for every caption
CAPTION_NOISE = ("independent", "shared")

#: The batch shape of every UNet forward in a loss sweep: a constant of the score, not a setting, since
#: another shape may change float32 rounding. 256 keeps a CPU near its best throughput for the twin UNet
#: (0.53 ms/sample vs 0.70 at 64 and 0.45 at 512) and pads a one-query probe by little in absolute time.
SWEEP_MICRO_BATCH = 256


def noise_key(seed: int, row: int, t: int, caption: int = 0) -> int:
    """The generator seed of the noise for (row, caption, t): a fixed, collision-free function of the four.

    Caption 0 maps to the same key as the (row, t) key of earlier genattr versions.
    """
    t, caption = int(t), int(caption)
    if not 0 <= t < _CAPTION_STRIDE or not 0 <= caption < _ROW_STRIDE // _CAPTION_STRIDE:
        raise ValueError(
            f"noise_key needs 0 <= t < {_CAPTION_STRIDE} and 0 <= caption < {_ROW_STRIDE // _CAPTION_STRIDE}, "
            f"got t={t}, caption={caption}"
        )
    slot = caption * _CAPTION_STRIDE + t
    return ((int(seed) * 2_147_483_647 + int(row)) * _ROW_STRIDE + slot) % (2**63 - 1)


def keyed_noise(
    seed: int,
    rows: Sequence[int],
    ts: Sequence[int],
    shape: Sequence[int],
    captions: Sequence[int] | None = None,
) -> torch.Tensor:
    """Standard normal noise, one draw of ``shape`` per (row, caption, t), independent of the batch it is in.

    ``captions=None`` keys every draw as caption 0 (one draw per (row, t)).
    """
    g = torch.Generator()
    out = torch.empty((len(rows), *shape))
    caps = [0] * len(rows) if captions is None else captions
    for k, (r, c, t) in enumerate(zip(rows, caps, ts, strict=True)):
        g.manual_seed(noise_key(seed, r, t, c))
        out[k] = torch.randn(tuple(shape), generator=g)
    return out


def strided_timesteps(num_train_timesteps: int, samples: int) -> list[int]:
    """``arange(0, T, T // samples)`` as the original (t = 0, 50, ..., 950 for 20 samples)."""
    stride = max(1, num_train_timesteps // int(samples))
    return list(range(0, num_train_timesteps, stride))[: int(samples)]


@torch.no_grad()
def loss_sweep(
    model: DiffusionModel,
    latents: np.ndarray,
    text: np.ndarray,
    rows: Sequence[int],
    timesteps: Sequence[int],
    *,
    seed: int,
    batch_size: int = 512,
    captions: Sequence[int] | None = None,
    caption_noise: str = "independent",
    device: torch.device | str = "cpu",
    desc: str | None = None,
    main_process: bool = True,
) -> np.ndarray:
    """Mean DDPM loss of each latent row over ``timesteps`` and ``captions`` (default: all), float64.

    ``caption_noise`` (:data:`CAPTION_NOISE`): ``independent`` draws one eps per (row, caption, t) as the
    original's ``collect_loss``; ``shared`` reuses the (row, t) draw for every caption.

    ``latents`` rows index [0, 2N) (flipped rows share the text of ``row % N``); evaluation is in eval
    mode without autocast, so the numbers depend only on the weights, the rows and the seed, never on
    ``batch_size`` (rounded up to a multiple of :data:`SWEEP_MICRO_BATCH`; it sets memory, not results).
    ``desc``: report progress under that name (on the main process).
    """
    if caption_noise not in CAPTION_NOISE:
        raise ConfigError(f"method.sweep.caption_noise={caption_noise} is unknown; choose one of {list(CAPTION_NOISE)}")
    per_caption = caption_noise == "independent"
    rows = [int(r) for r in rows]
    caps = list(range(text.shape[1])) if captions is None else [int(c) for c in captions]
    jobs = [(k, r, c, t) for k, r in enumerate(rows) for c in caps for t in timesteps]
    total = np.zeros(len(rows), dtype=np.float64)
    unet = model.unet
    was_training = unet.training
    unet.eval()
    ac = model.alphas_cumprod.to(device)
    shape = latents.shape[1:]
    micro = SWEEP_MICRO_BATCH
    # chunks are whole multiples of the micro-batch, so the micro-batches (and their padded tail) are
    # the same slices of the job list for every batch_size
    chunk_size = micro * max(1, -(-int(batch_size) // micro))
    starts = range(0, len(jobs), chunk_size)
    if desc is not None:
        starts = track(starts, desc=desc, unit="chunk", main_process=main_process)
    for start in starts:
        chunk = jobs[start : start + chunk_size]
        k = np.array([j[0] for j in chunk])
        r = np.array([j[1] for j in chunk])
        c = np.array([j[2] for j in chunk])
        t = torch.tensor([j[3] for j in chunk])
        eps = keyed_noise(seed, r, t.tolist(), shape, c if per_caption else None)
        x0 = torch.from_numpy(np.asarray(latents[r], dtype=np.float32))
        cond = gather_text(text, r, c)
        pad = -len(chunk) % micro
        if pad:  # only the last chunk of the sweep: repeat its first job
            x0, cond, eps = (torch.cat([v, v[:1].expand(pad, *v.shape[1:])]) for v in (x0, cond, eps))
            t = torch.cat([t, t[:1].expand(pad)])
        x0, cond, t, eps = x0.to(device), cond.to(device), t.to(device), eps.to(device)
        per = torch.cat(
            [
                ddpm_loss(unet, ac, x0[s : s + micro], cond[s : s + micro], t[s : s + micro], eps[s : s + micro])
                for s in range(0, x0.shape[0], micro)
            ]
        )[: len(chunk)]
        np.add.at(total, k, per.double().cpu().numpy())
    unet.train(was_training)
    return total / (len(caps) * len(timesteps))


def max_over_flips(values: np.ndarray) -> np.ndarray:
    """(2N,) scores of unflipped then flipped rows -> (N,) max of the two (the paper's treatment)."""
    n = values.shape[0] // 2
    return np.maximum(values[:n], values[n:])
