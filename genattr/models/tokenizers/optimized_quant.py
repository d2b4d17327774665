"""Algorithm 3: optimised multi-scale quantisation (soft assignments, annealed τ, progressive freezing).

Why: an AR-sampled multi-scale token set is not the greedy residual decomposition of its own f̂, so greedy
quantisation (Alg. 2) cannot recover it even from the exact latent. Optimising soft code assignments of all
scales jointly against f finds token sets whose f̂ is much closer to f, which is what makes QuantLoss separate
generated images from the rest.

Schedule, as Zhao et al.'s ``VarIAR._optimized_quant`` + ``VectorQuantizer2.refine_soft_assign``: start from the
greedy tokens; round 1 frees every scale (``fix_scale`` = S), then rounds with ``fix_scale`` = S−1, S−2, …,
``rounds_stop_scale`` + 1 keep the scales ≥ ``fix_scale`` at their hard code (VAR's 10 scales with stop 4: 6
rounds). Every round starts afresh from the previous round's snapped tokens: logits 0 with ``init_logit`` on that
token, a new Adam (lr ``lr``) on the free scales, ``iters`` steps on 0.5·MSE(f̂, f) with p = softmax(logits/τ),
z = p @ E and τ annealed geometrically ``tau[0]`` → ``tau[1]`` within the round; the round ends by snapping to the
argmax. The answer is the last round's snapped tokens.

``keep_best`` (a genattr / rizvisaira addition, off by default) instead returns, per image, whichever hard token
set had the lowest QuantLoss among greedy, the argmax every ``keep_best_every`` steps and every round's snap, so
the result is never worse than greedy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from genattr.models.tokenizers.base import MultiScaleTokenizer


def quant_loss(tokenizer: MultiScaleTokenizer, feature: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-image QuantLoss ‖f − f̂(tokens)‖² as a flattened mean, [B]."""
    with torch.no_grad():
        return (tokenizer.tokens_to_latent(tokens) - feature.float()).square().flatten(1).mean(1)


def alg3_rounds(n_scales: int, rounds_stop_scale: int) -> list[int]:
    """The ``fix_scale`` of each round: every scale free (``n_scales``), then n_scales−1 down to stop+1."""
    if isinstance(rounds_stop_scale, bool) or not isinstance(rounds_stop_scale, int) or rounds_stop_scale < 0:
        raise ValueError(f"alg3 rounds_stop_scale={rounds_stop_scale!r}; use an integer >= 0")
    return [n_scales, *range(n_scales - 1, rounds_stop_scale, -1)]


def round_logits(tokens: torch.Tensor, slices: list[slice], vocab: int, init_logit: float) -> list[torch.Tensor]:
    """A round's starting logits per scale, [B, pn², V]: 0 everywhere, ``init_logit`` on the current token."""
    return [F.one_hot(tokens[:, s], vocab).float().mul(init_logit) for s in slices]


def tau_at(step: int, iters: int, tau: tuple[float, float]) -> float:
    """τ of a step: geometric from tau[0] at step 0 to tau[1] at the last step (tau[1] for a one-step round)."""
    t0, t1 = tau
    if iters <= 1:
        return t1
    return t0 * (t1 / t0) ** (step / (iters - 1))


def _soft_latent(tokenizer, logits: list[torch.Tensor], tau: float, fix_scale: int) -> torch.Tensor:
    codebook = tokenizer.codebook.detach()
    maps = []
    for si, (pn, lg) in enumerate(zip(tokenizer.patch_nums, logits, strict=True)):
        if si >= fix_scale:
            z = F.embedding(lg.argmax(-1), codebook)
        else:
            z = torch.softmax(lg / tau, dim=-1) @ codebook
        maps.append(z.transpose(1, 2).reshape(z.shape[0], -1, pn, pn))
    return tokenizer.quantize.latent_from_maps(maps)


def optimized_quantize(
    tokenizer: MultiScaleTokenizer,
    feature: torch.Tensor,
    *,
    rounds_stop_scale: int = 4,
    iters: int = 200,
    lr: float = 0.1,
    tau: tuple[float, float] = (2.0, 0.5),
    init_logit: float = 0.5,
    keep_best: bool = False,
    keep_best_every: int = 25,
) -> torch.Tensor:
    """Tokens [B, L] of latents ``feature`` [B, C, H, W] by Algorithm 3 (batched; the tokenizer is not changed).

    The keyword defaults are the official code's (``configs/var.yaml``); ``conf/method/prada.yaml`` holds the
    run's values.
    """
    f = feature.detach().float()
    tokens = tokenizer.quantize(f)  # greedy (Alg. 2)
    slices = tokenizer.scale_slices()
    rounds = alg3_rounds(len(slices), rounds_stop_scale)
    best, best_loss = tokens.clone(), quant_loss(tokenizer, f, tokens)

    def consider(hard: torch.Tensor) -> None:
        nonlocal best, best_loss
        loss = quant_loss(tokenizer, f, hard)
        better = loss < best_loss
        best = torch.where(better[:, None], hard, best)
        best_loss = torch.where(better, loss, best_loss)

    def snap(logits: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([lg.detach().argmax(-1) for lg in logits], 1)

    with torch.enable_grad():
        for fix_scale in rounds:
            logits = round_logits(tokens, slices, tokenizer.vocab_size, init_logit)
            free = [lg.requires_grad_(True) for lg in logits[:fix_scale]]
            opt = torch.optim.Adam(free, lr=lr)
            for it in range(iters):
                loss = 0.5 * (_soft_latent(tokenizer, logits, tau_at(it, iters, tau), fix_scale) - f).square().mean()
                grads = torch.autograd.grad(loss, free)
                for p, g in zip(free, grads, strict=True):
                    p.grad = g
                opt.step()
                if keep_best and keep_best_every > 0 and (it + 1) % keep_best_every == 0:
                    consider(snap(logits))
            tokens = snap(logits)
            if keep_best:
                consider(tokens)
    return best if keep_best else tokens
