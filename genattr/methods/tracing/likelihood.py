"""Teacher-forced token log-likelihoods under each variant (Stage 2 and one-step PRADA).

For recovered tokens t and a class c, one generator gives per token: ℓ_c (log p(t_p | t_<p, c)), ℓ_u (same
with the null class) and ℓ_g, the log-probability under the sampler's OWN guided distribution
(``generator.guided_logits``: VAR cfg ramp, RAR power-cosine ramp + temperature), plus the rank of the true
token under the guided logits. Scoring the sampler's distribution rather than the raw conditional model is
what makes the own-variant likelihood advantage appear (spec §6: E[log p_m − log p_m′] = KL ≥ 0 only for the
distribution that actually sampled).

Class labels are unknown in the task, so every image carries ``K'`` candidate classes; per-candidate results
are combined with ``max`` (the candidate with the highest guided likelihood) or ``logmeanexp`` (of the
per-image total log-likelihood, divided back by the token count).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from genattr.models.autoregressive.base import TracedGenerator

#: Summary features per variant (in this order) fed to the Stage 2 calibrators. ``support`` is the share of tokens
#: inside the sampler's top-k / top-p support (VAR; 1 for samplers without truncation), rizvisaira's in-support flag.
SUMMARY_FEATURES: tuple[str, ...] = ("logp_cond", "logp_uncond", "logp_guided", "rank", "support")
AGGREGATIONS = ("max", "logmeanexp")


@torch.no_grad()
def token_loglik(
    gen: TracedGenerator, tokens: torch.Tensor, labels: torch.Tensor, *, guided: bool = True
) -> dict[str, torch.Tensor]:
    """Per-token ``cond``, ``uncond``, ``guided`` log-likelihoods and ``rank`` (float) [B, L] of ``tokens``."""
    null = torch.full_like(labels, int(gen.null_class))
    lc = gen.token_logits(tokens, labels).float()
    lu = gen.token_logits(tokens, null).float()
    idx = tokens.unsqueeze(-1)
    out = {
        "cond": lc.log_softmax(-1).gather(-1, idx).squeeze(-1),
        "uncond": lu.log_softmax(-1).gather(-1, idx).squeeze(-1),
    }
    if guided:
        lg = gen.guided_logits(lc, lu).float()
        true = lg.gather(-1, idx)
        out["guided"] = lg.log_softmax(-1).gather(-1, idx).squeeze(-1)
        out["rank"] = (lg > true).sum(-1).float()
        if hasattr(gen, "support_mask"):
            out["support"] = gen.support_mask(lg).gather(-1, idx).squeeze(-1).float()
        else:
            out["support"] = torch.ones_like(out["rank"])
    return out


def _aggregate(per_cand: np.ndarray, how: str, axis: int = 1) -> np.ndarray:
    if how == "max":
        return per_cand.max(axis=axis)
    if how == "logmeanexp":
        m = per_cand.max(axis=axis, keepdims=True)
        return (m + np.log(np.mean(np.exp(per_cand - m), axis=axis, keepdims=True))).squeeze(axis)
    raise ValueError(f"aggregation {how!r}; use one of {AGGREGATIONS}")


def summary_features(
    gen: TracedGenerator,
    tokens: np.ndarray,
    candidates: np.ndarray,
    *,
    aggregate: str = "max",
    batch_size: int,
    device: torch.device,
) -> np.ndarray:
    """[N, 5] = (logp_cond, logp_uncond, logp_guided, −log1p(rank), support) per-token means, over candidate classes.

    ``max``: the features of the candidate with the highest guided likelihood; ``logmeanexp``: log-mean-exp of
    the per-image TOTAL log-likelihoods (÷ L), mean rank feature over candidates.
    """
    n, k = candidates.shape
    out = np.zeros((n, len(SUMMARY_FEATURES)))
    for s in range(0, n, batch_size):
        tok = torch.from_numpy(tokens[s : s + batch_size]).to(device)
        cand = candidates[s : s + batch_size]
        feats = np.zeros((len(tok), k, len(SUMMARY_FEATURES)))
        for j in range(k):
            lab = torch.from_numpy(cand[:, j]).to(device)
            ll = token_loglik(gen, tok, lab)
            feats[:, j, 0] = ll["cond"].mean(1).cpu().numpy()
            feats[:, j, 1] = ll["uncond"].mean(1).cpu().numpy()
            feats[:, j, 2] = ll["guided"].mean(1).cpu().numpy()
            feats[:, j, 3] = -torch.log1p(ll["rank"]).mean(1).cpu().numpy()
            feats[:, j, 4] = ll["support"].mean(1).cpu().numpy()
        if aggregate == "max":
            best = feats[:, :, 2].argmax(axis=1)
            out[s : s + len(tok)] = feats[np.arange(len(tok)), best]
        else:
            length = tokens.shape[1]
            for c in range(3):
                out[s : s + len(tok), c] = _aggregate(feats[:, :, c] * length, aggregate) / length
            out[s : s + len(tok), 3:] = feats[:, :, 3:].mean(axis=1)
    return out


def prada_features(
    gen: TracedGenerator, tokens: np.ndarray, candidates: np.ndarray, *, batch_size: int, device: torch.device
) -> np.ndarray:
    """Per-token (ℓ_c, ℓ_u) for every candidate class: float32 [N, K', L, 2] (PRADA's input, spec §7)."""
    n, k = candidates.shape
    out = np.zeros((n, k, tokens.shape[1], 2), dtype=np.float32)
    for s in range(0, n, batch_size):
        tok = torch.from_numpy(tokens[s : s + batch_size]).to(device)
        for j in range(k):
            lab = torch.from_numpy(candidates[s : s + batch_size, j]).to(device)
            ll = token_loglik(gen, tok, lab, guided=False)
            out[s : s + len(tok), j, :, 0] = ll["cond"].cpu().numpy()
            out[s : s + len(tok), j, :, 1] = ll["uncond"].cpu().numpy()
    return out


def logmeanexp(x: np.ndarray, axis: int) -> np.ndarray:
    """Numerically stable log(mean(exp(x))) along ``axis``."""
    return _aggregate(x, "logmeanexp", axis=axis)


def scale_slices(patch_nums: Sequence[int] | None, num_tokens: int, groups: int = 1) -> list[tuple[int, int]]:
    """Token ranges of each scale; a single-scale tokenizer's raster order is cut into ``groups`` near-equal ranges.

    ``groups`` > 1 exists for PRADA on RAR: its power-cosine CFG ramp guides mostly the late tokens, so one weight
    per raster-order group (like VAR's per-scale weights) lets the score function find where the shift is.
    """
    if not patch_nums:
        if not 1 <= groups <= num_tokens:
            raise ValueError(f"{groups} position groups for {num_tokens} tokens; use 1..{num_tokens}")
        return [(g * num_tokens // groups, (g + 1) * num_tokens // groups) for g in range(groups)]
    out, start = [], 0
    for pn in patch_nums:
        out.append((start, start + pn * pn))
        start += pn * pn
    if start != num_tokens:
        raise ValueError(f"patch_nums {list(patch_nums)} give {start} tokens, not {num_tokens}")
    return out


def perplexity(mean_logp: np.ndarray) -> np.ndarray:
    """exp of the mean NLL (for reports)."""
    return np.exp(-np.asarray(mean_logp)) if np.all(np.isfinite(mean_logp)) else np.full_like(mean_logp, math.inf)
