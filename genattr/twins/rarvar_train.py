"""Brief CPU training of the rarvar twin's tokenizers and generators (seconds each, deterministic).

Tokenizers learn a VQ autoencoder on procedural images (straight-through estimator, codebook + commitment
loss, data-initialised codebook with dead-code restarts so a few hundred steps use most codes). Released
tokenizers are "injective enough" (spec §9.3.2) after long training; a 120-step twin is not, so two optional
terms buy it within a CPU budget:

* ``cycle``: ‖E(D(f̂)) − f̂‖², used for the multi-scale family (QuantLoss AUC after inverse-decoder fine-tuning
  ≈0.76 → ≈0.94);
* ``code_ce``: the encoder must read every code back from the decoded image (cross-entropy over code distances,
  with random codes mixed in), used for the single-scale family: sampled-token recovery from the PNGs ≈28 % →
  ≈96 %. Its weight is a trade-off: at 1.0 the data tokens become so predictable that the four generator
  variants sample alike (Stage 2 on the sampled tokens fell to chance); at 0.1 they stay distinct.

Generators learn next-token / next-scale prediction on the trained tokenizer's greedy tokens with 10% label
drop, so classifier-free guidance and PRADA's unconditional likelihood exist.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _restart_dead(codebook: torch.Tensor, used: torch.Tensor, pool: torch.Tensor, gen: torch.Generator) -> None:
    """Replace never-hit codes by random vectors of ``pool`` (current encoder outputs), in place."""
    dead = (~used).nonzero().flatten()
    if len(dead) and len(pool):
        pick = torch.randint(len(pool), (len(dead),), generator=gen)
        codebook.data[dead] = pool[pick] + 1e-3 * torch.randn(len(dead), pool.shape[1], generator=gen)


def _latent_rows(f: torch.Tensor) -> torch.Tensor:
    return f.detach().permute(0, 2, 3, 1).reshape(-1, f.shape[1])


def train_tokenizer(
    tok: nn.Module,
    images: torch.Tensor,
    *,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    beta: float = 0.25,
    cycle: float = 0.0,
    code_ce: float = 0.0,
    code_ce_resample: float = 0.3,
    code_ce_temperature: float = 0.1,
) -> list[float]:
    """Train a ``SingleScaleVQ`` or ``MultiScaleVQ`` on images in [0, 1]; returns the loss curve."""
    gen = torch.Generator().manual_seed(seed)
    multi = tok.family_kind == "var"
    opt = torch.optim.Adam(tok.parameters(), lr=lr)
    codebook = tok.quantize.embedding.weight
    with torch.no_grad():  # data-dependent codebook init
        f0 = tok.encode_feature(images[torch.randperm(len(images), generator=gen)[:64]])
        rows = _latent_rows(f0)
        if multi:  # residuals shrink over scales: mix full-scale rows with down-scaled ones
            rows = torch.cat([rows, _latent_rows(F.interpolate(f0, scale_factor=0.5, mode="area"))])
        codebook.data.copy_(rows[torch.randint(len(rows), (codebook.shape[0],), generator=gen)])
    used = torch.zeros(codebook.shape[0], dtype=torch.bool)
    curve = []
    tok.train()
    for step in range(steps):
        x = images[torch.randint(len(images), (batch,), generator=gen)]
        f = tok.encode_feature(x)
        with torch.no_grad():
            idx = tok.quantize(f)
        used[idx.flatten()] = True
        f_q = tok.tokens_to_latent(idx)
        vq = F.mse_loss(f_q, f.detach()) + beta * F.mse_loss(f, f_q.detach())
        f_st = f + (f_q - f).detach()
        if multi:
            rec = tok.decoder(tok.post_quant_conv(f_st))
            loss = F.mse_loss(rec, x * 2 - 1) + vq
        else:
            loss = F.mse_loss(tok.decoder(f_st), x) + vq
        if cycle > 0:  # re-encoding a decoded code map must land on that code map
            target = f_q.detach()
            loss = loss + cycle * F.mse_loss(tok.encode_feature(tok.decode_latent(target)), target)
        if code_ce > 0:  # single-scale: the encoder must read every code back from its decoded image
            loss = loss + code_ce * _code_cross_entropy(tok, idx, code_ce_resample, code_ce_temperature, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curve.append(loss.item())
        if (step + 1) % 50 == 0 and step + 1 < steps * 0.8:
            _restart_dead(codebook, used, _latent_rows(f), gen)
            used.zero_()
    tok.eval()
    return curve


def _code_cross_entropy(
    tok: nn.Module, idx: torch.Tensor, resample: float, temperature: float, gen: torch.Generator
) -> torch.Tensor:
    """Cross-entropy of re-encoding ``D(codes)``: logits are −‖E(D(e_t))_p − e_k‖² / temperature.

    A share ``resample`` of the data's tokens is replaced by random codes, so codes that data rarely uses (but a
    sampler may emit) are also made recoverable; the target is the token map that was decoded.
    """
    swap = torch.rand(idx.shape, generator=gen) < resample
    target = torch.where(swap, torch.randint(tok.vocab_size, idx.shape, generator=gen), idx)
    f = tok.encode_feature(tok.decode_latent(tok.tokens_to_latent(target)))
    rows = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])
    dist = (rows[:, None, :] - tok.codebook[None]).square().sum(-1)
    return F.cross_entropy(-dist / temperature, target.reshape(-1))


def train_generator(
    model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor, *, steps: int, batch: int, lr: float, seed: int
) -> list[float]:
    """Cross-entropy training of a VAR or RAR generator on (tokens, labels) with its own label drop."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    curve = []
    model.train()
    for _ in range(steps):
        pick = torch.randint(len(tokens), (batch,), generator=gen)
        out = model(tokens[pick], labels[pick], generator=gen)
        logits, target = out if isinstance(out, tuple) else (out, tokens[pick])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        curve.append(loss.item())
    model.eval()
    return curve
