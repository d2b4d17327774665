"""Algorithm 3: optimised multi-scale quantisation (soft assignments, annealed τ, progressive freezing, keep-best).

Why: an AR-sampled multi-scale token set is not the greedy residual decomposition of its own f̂, so greedy
quantisation (Alg. 2) cannot recover it even from the exact latent. Optimising soft code assignments of all
scales jointly against f finds token sets whose f̂ is much closer to f, which is what makes QuantLoss separate
generated images from the rest.

Schedule (Zhao et al., ``refine_soft_assign``): logits per scale start at 0 with ``init_logit`` on the greedy
code; round 1 frees every scale, then rounds with ``fix_scale`` = S−1, S−2, …, ``rounds_stop_scale`` keep the
scales ≥ ``fix_scale`` at their hard argmax. Each round runs ``iters`` Adam steps on 0.5·MSE(f̂, f) with
p = softmax(logits/τ), z = p @ E and τ annealed geometrically ``tau[0]`` → ``tau[1]`` within the round. The
answer is the argmax, snapped. With ``keep_best`` the hard argmax is evaluated every ``keep_best_every``
iterations (and at the end) and kept per sample only when it beats the best so far, starting from greedy, so
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
    keep_best: bool = True,
    keep_best_every: int = 25,
) -> torch.Tensor:
    """Tokens [B, L] of latents ``feature`` [B, C, H, W] by Algorithm 3 (batched; the tokenizer is not changed)."""
    f = feature.detach().float()
    greedy = tokenizer.quantize(f)
    slices = tokenizer.scale_slices()
    n_scales = len(slices)
    vocab = tokenizer.vocab_size

    best = greedy.clone()
    best_loss = quant_loss(tokenizer, f, best)

    def consider(logits: list[torch.Tensor]) -> None:
        nonlocal best, best_loss
        hard = torch.cat([lg.detach().argmax(-1) for lg in logits], 1)
        loss = quant_loss(tokenizer, f, hard)
        better = loss < best_loss if keep_best else torch.ones_like(loss, dtype=torch.bool)
        best = torch.where(better[:, None], hard, best)
        best_loss = torch.where(better, loss, best_loss)

    logits = [F.one_hot(greedy[:, s], vocab).float().mul(init_logit) for s in slices]
    rounds = [n_scales, *range(n_scales - 1, rounds_stop_scale - 1, -1)]
    t0, t1 = tau
    with torch.enable_grad():
        for fix_scale in rounds:
            free = [lg.requires_grad_(True) for lg in logits[:fix_scale]]
            for lg in logits[fix_scale:]:
                lg.requires_grad_(False)
            opt = torch.optim.Adam(free, lr=lr)
            for it in range(iters):
                cur_tau = t0 * (t1 / t0) ** (it / max(iters - 1, 1))
                loss = 0.5 * (_soft_latent(tokenizer, logits, cur_tau, fix_scale) - f).square().mean()
                grads = torch.autograd.grad(loss, free)
                for p, g in zip(free, grads, strict=True):
                    p.grad = g
                opt.step()
                if keep_best and keep_best_every > 0 and (it + 1) % keep_best_every == 0:
                    consider(logits)
            consider(logits)
            logits = [lg.detach() for lg in logits]
    if not keep_best:  # plain Alg. 3: the snapped argmax of the last round
        return torch.cat([lg.argmax(-1) for lg in logits], 1)
    return best
