"""The AbU core: weight subsets, the diagonal Fisher from per-sample gradients, the Newton-style unlearning step.

theta <- theta + alpha / N * (F + lambda * mean_layer F)^-1 * grad L(query)   (paper Eq. 5; ``specs`` 1.1-1.5)

on the selected weights only. F is the mean of squared per-sample gradients of the DDPM loss (one random
timestep, noise and caption per sample) computed with ``torch.func`` (``vmap`` of ``grad`` over
``functional_call``). The original (``mscoco/compute_influence.py``) has no damping: lambda = 0 is the
default, and FastGDA's layer-wise damping (lambda = 0.1) is the flag ``method.unlearn.damping``. Undamped, a
zero Fisher entry divides by zero; the original then writes inf/nan into the weights without a word, so
:func:`precondition` refuses such a Fisher with a sentence instead.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from genattr.engine.progress import track
from genattr.methods.attribution.training import gather_text
from genattr.models.diffusion import DiffusionModel, add_noise, ddpm_loss
from genattr.utils.errors import ConfigError

log = logging.getLogger(__name__)

#: ``method.weights`` options -> a regex over parameter names (the original's substring rules).
WEIGHT_SUBSETS: dict[str, str] = {
    "cross_attn_kv": r"attn2\..*to_[kv]\.",
    "cross_attn": r"attn2\.",
    "attn": r"attn[12]\.",
    "all": r".",
}


def select_parameters(unet: torch.nn.Module, subset: str) -> list[str]:
    """Names of the parameters AbU updates for ``subset`` (``cross_attn_kv`` by default in the paper)."""
    if subset not in WEIGHT_SUBSETS:
        raise ConfigError(f"method.weights={subset} is unknown; choose one of {sorted(WEIGHT_SUBSETS)}")
    pattern = re.compile(WEIGHT_SUBSETS[subset])
    names = [n for n, _ in unet.named_parameters() if pattern.search(n)]
    if not names:
        raise ConfigError(f"method.weights={subset} selects no parameter of this UNet (does it have cross-attention?)")
    return names


@contextlib.contextmanager
def _vmap_friendly_attention() -> Iterator[None]:
    """Math SDPA under vmap: the fused kernels have no batching rule (the original disables mem-efficient SDPA)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        yield


def per_sample_grads(
    model: DiffusionModel,
    names: Sequence[str],
    x0: torch.Tensor,
    cond: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Gradients of each sample's DDPM loss w.r.t. the selected parameters, shape (B, *param.shape)."""
    unet = model.unet
    params = dict(unet.named_parameters())
    sel = {n: params[n].detach() for n in names}
    ac = model.alphas_cumprod.to(x0.device)

    def one(p: dict[str, torch.Tensor], x: torch.Tensor, c: torch.Tensor, tt: torch.Tensor, e: torch.Tensor):
        xt = add_noise(ac, x[None], e[None], tt[None])
        pred = functional_call(unet, p, (xt, tt[None]), {"encoder_hidden_states": c[None]}).sample
        return (pred.float() - e[None].float()).pow(2).mean()

    with _vmap_friendly_attention():
        out = vmap(grad(one), in_dims=(None, 0, 0, 0, 0), randomness="different")(sel, x0, cond, t, eps)
    return {n: g.detach() for n, g in out.items()}


def _fisher_draws(
    model: DiffusionModel, latents: np.ndarray, text: np.ndarray, epochs: int, seed: int
) -> Iterator[tuple[np.ndarray, np.ndarray, torch.Tensor, torch.Tensor]]:
    """For each sample: a row of [0, 2N), a random caption, a uniform timestep and noise (one stream)."""
    gen = torch.Generator().manual_seed(int(seed))
    n_rows = latents.shape[0]
    for _ in range(int(epochs)):
        rows = torch.randperm(n_rows, generator=gen).numpy()
        caps = torch.randint(0, text.shape[1], (n_rows,), generator=gen).numpy()
        t = torch.randint(0, model.num_timesteps, (n_rows,), generator=gen)
        eps = torch.randn((n_rows, *latents.shape[1:]), generator=gen)
        yield rows, caps, t, eps


def fisher_sums(
    model: DiffusionModel,
    latents: np.ndarray,
    text: np.ndarray,
    names: Sequence[str],
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    device: torch.device | str = "cpu",
    naive: bool = False,
    share: Callable[[int], range] | None = None,
    desc: str | None = None,
    main_process: bool = True,
) -> tuple[dict[str, torch.Tensor], int]:
    """Sums of squared per-sample gradients (float64, on ``device``) over ``epochs`` passes of the 2N rows, and
    how many samples they hold.

    Every pass draws its whole random stream (:func:`_fisher_draws`) and cuts it into batches of
    ``batch_size``; ``share(n_batches)`` picks the batches this process computes (all by default), so
    processes that split the batches compute each one exactly as a single process would. ``naive=True``
    computes the same per-sample gradients one backward pass at a time (the reference for the test and the
    benchmark).
    """
    unet = model.unet
    params = dict(unet.named_parameters())
    total = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in names}
    count = 0
    ac = model.alphas_cumprod.to(device)
    bs = int(batch_size)
    for epoch, (rows, caps, t, eps) in enumerate(_fisher_draws(model, latents, text, epochs, seed)):
        starts = range(0, len(rows), bs)
        if share is not None:
            mine = share(len(starts))
            starts = starts[mine.start : mine.stop]
        if desc is not None:
            starts = track(starts, desc=f"{desc} {epoch + 1}/{epochs}", unit="batch", main_process=main_process)
        for s in starts:
            r, c = rows[s : s + bs], caps[s : s + bs]
            x0 = torch.from_numpy(np.asarray(latents[r], dtype=np.float32)).to(device)
            cond = gather_text(text, r, c).to(device)
            tt, ee = t[s : s + bs].to(device), eps[s : s + bs].to(device)
            if naive:
                for k in range(len(r)):
                    loss = ddpm_loss(unet, ac, x0[k : k + 1], cond[k : k + 1], tt[k : k + 1], ee[k : k + 1])[0]
                    gs = torch.autograd.grad(loss, [params[n] for n in names])
                    for n, g in zip(names, gs, strict=False):
                        total[n] += g.detach().double().pow(2)
            else:
                gs = per_sample_grads(model, names, x0, cond, tt, ee)
                for n in names:
                    total[n] += gs[n].double().pow(2).sum(0)
            count += len(r)
    return total, count


def diagonal_fisher(
    model: DiffusionModel,
    latents: np.ndarray,
    text: np.ndarray,
    names: Sequence[str],
    *,
    epochs: int = 5,
    batch_size: int = 32,
    seed: int = 0,
    device: torch.device | str = "cpu",
    naive: bool = False,
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher E[g^2] (float64, CPU) over ``epochs`` passes of the 2N rows, in one process
    (:func:`fisher_sums`; a run shards the batches across its processes)."""
    total, count = fisher_sums(
        model, latents, text, names, epochs=epochs, batch_size=batch_size, seed=seed, device=device, naive=naive
    )
    return {n: (v / count).detach().cpu() for n, v in total.items()}


def query_gradient(
    model: DiffusionModel,
    names: Sequence[str],
    x0: torch.Tensor,
    cond: torch.Tensor,
    *,
    draws: int,
    batch_size: int,
    seed: int,
) -> dict[str, torch.Tensor]:
    """Gradient of the query's DDPM loss averaged over ``draws`` (t, eps) pairs, float64.

    As the original: micro-batches of ``batch_size`` copies of the query with *distinct* timesteps
    (a random permutation of [0, T)) and fresh noise.
    """
    unet = model.unet
    params = dict(unet.named_parameters())
    device = x0.device
    gen = torch.Generator().manual_seed(int(seed))
    T = model.num_timesteps
    bs = min(int(batch_size), T)
    steps = max(1, -(-int(draws) // bs))
    total = {n: torch.zeros_like(params[n], dtype=torch.float64) for n in names}
    ac = model.alphas_cumprod.to(device)
    for _ in range(steps):
        t = torch.randperm(T, generator=gen)[:bs]
        eps = torch.randn((bs, *x0.shape), generator=gen)
        loss = ddpm_loss(
            unet, ac, x0[None].expand(bs, *x0.shape), cond[None].expand(bs, *cond.shape), t.to(device), eps.to(device)
        ).mean()
        gs = torch.autograd.grad(loss, [params[n] for n in names])
        for n, g in zip(names, gs, strict=False):
            total[n] += g.double()
    return {n: v / steps for n, v in total.items()}


def precondition(
    g: Mapping[str, torch.Tensor], fisher: Mapping[str, torch.Tensor], damping: float
) -> dict[str, torch.Tensor]:
    """(F + damping * mean_layer(F))^-1 g, per parameter tensor; damping 0 is the original's division by F.

    A zero in the (damped) Fisher is a :class:`ConfigError`: the original divides by it and silently turns
    those weights into inf (or nan where the gradient is zero too), which makes every loss nan.
    """
    out = {}
    for n, v in g.items():
        f = fisher[n].to(v.device, torch.float64)
        denom = f + float(damping) * f.mean()
        zeros = int((denom == 0).sum())
        if zeros:
            raise ConfigError(
                f"the Fisher of {n} has {zeros} zero entries and method.unlearn.damping={damping}: the undamped "
                "update grad / (N F) would write inf/nan into those weights; set method.unlearn.damping>0 "
                "(FastGDA uses 0.1) or use a Fisher without zeros"
            )
        out[n] = v / denom
    return out


@torch.no_grad()
def _apply(model: DiffusionModel, delta: Mapping[str, torch.Tensor]) -> None:
    params = dict(model.unet.named_parameters())
    for n, d in delta.items():
        params[n].copy_((params[n].double() + d.to(params[n].device)).to(params[n].dtype))


def unlearn(
    model: DiffusionModel,
    names: Sequence[str],
    fisher: Mapping[str, torch.Tensor],
    x0: torch.Tensor,
    cond: torch.Tensor,
    *,
    alpha: float,
    n_train: int,
    steps: int = 1,
    draws: int = 512,
    batch_size: int = 80,
    damping: float = 0.0,
    seed: int = 0,
) -> None:
    """Unlearn the query (x0, cond) in place: ``steps`` preconditioned ascent steps on its DDPM loss.

    Per selected weight: p += alpha * g / (n_train * (F + damping * mean F)), g the query gradient averaged
    over ``draws`` (t, eps) pairs; ``damping=0`` is ``mscoco/compute_influence.py``'s update.
    """
    if alpha == 0:
        return
    for s in range(int(steps)):
        g = query_gradient(model, names, x0, cond, draws=draws, batch_size=batch_size, seed=seed * 1009 + s)
        step = precondition(g, fisher, damping)
        _apply(model, {n: float(alpha) / int(n_train) * v for n, v in step.items()})


def snapshot(model: DiffusionModel, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Copies of the selected weights, to undo an unlearning step exactly."""
    params = dict(model.unet.named_parameters())
    return {n: params[n].detach().clone() for n in names}


@torch.no_grad()
def restore(model: DiffusionModel, saved: Mapping[str, torch.Tensor]) -> None:
    params = dict(model.unet.named_parameters())
    for n, v in saved.items():
        params[n].copy_(v)
