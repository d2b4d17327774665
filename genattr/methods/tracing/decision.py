"""Stage 1 decision rule: per-family z-scores of log provenance scores, tie-break by z, outlier thresholds.

Raw QuantLoss / EncLoss values are not comparable across families (different latent sizes and codebooks), so
each family's log score is standardised with the mean / std of that family's OWN train images (spec §4,
rizvisaira ``stage1.py``). The lower z wins; exact ties go to the first family of ``families`` (RAR). The
image is an outlier when its winning z exceeds the winning family's threshold τ_f, chosen by one of:

* ``quantile``: τ_f = q-quantile of family f's own train z (train has no outliers, so this fixes the in-family
  rejection rate at 1 − q);
* ``val_opt``: the pair (τ_rar, τ_var) maximising 3-way (rar / var / outlier) accuracy on the labelled val split,
  searched over a grid of candidate z values (val has ≈11% outliers, the test set reportedly ≈45%, so this
  under-calls outliers on test: logged);
* ``zscore_k``: τ_f = k, i.e. μ_f + kσ_f on the log score.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from genattr.utils.errors import ConfigError

log = logging.getLogger(__name__)
STRATEGIES = ("quantile", "val_opt", "zscore_k")
OUTLIER = "outlier"


@dataclass
class ZScorer:
    """μ_f, σ_f of log scores per family, fitted on each family's own train images."""

    mu: np.ndarray  # [F]
    sigma: np.ndarray  # [F]

    @classmethod
    def fit(cls, log_scores: np.ndarray, family_index: np.ndarray, n_families: int) -> ZScorer:
        """``log_scores`` [N, F] (column f = family f's signal); ``family_index`` [N] = own family of each image."""
        mu, sigma = np.zeros(n_families), np.ones(n_families)
        for f in range(n_families):
            own = log_scores[family_index == f, f]
            if own.size < 2:
                raise ConfigError(f"z-scoring family {f} needs at least 2 own-family train images, got {own.size}")
            mu[f], sigma[f] = float(own.mean()), float(max(own.std(ddof=1), 1e-12))
        return cls(mu, sigma)

    def __call__(self, log_scores: np.ndarray) -> np.ndarray:
        return (np.asarray(log_scores, dtype=np.float64) - self.mu) / self.sigma


def safe_log(scores: np.ndarray, eps: float = 1e-30) -> np.ndarray:
    """log of a non-negative score, floored so an exact re-encoding (score 0) stays finite."""
    return np.log(np.maximum(np.asarray(scores, dtype=np.float64), eps))


def assign_family(z: np.ndarray, thresholds: Sequence[float], families: Sequence[str]) -> list[str]:
    """Family (or ``outlier``) per row of ``z`` [N, F]: argmin z (ties -> first family), outlier if z > τ."""
    z = np.asarray(z, dtype=np.float64)
    win = np.argmin(z, axis=1)  # argmin returns the first minimum: ties go to families[0]
    zwin = z[np.arange(len(z)), win]
    tau = np.asarray(thresholds, dtype=np.float64)[win]
    return [OUTLIER if zw > t else families[w] for w, zw, t in zip(win, zwin, tau, strict=True)]


def fit_thresholds(
    strategy: str,
    *,
    families: Sequence[str],
    train_z: np.ndarray,
    train_family: np.ndarray,
    val_z: np.ndarray | None = None,
    val_family: Sequence[str] | None = None,
    q: float = 0.95,
    k: float = 2.0,
    grid: int = 64,
) -> np.ndarray:
    """τ per family under ``strategy`` (see module docstring); ``train_family`` holds family indices."""
    n = len(families)
    if strategy == "quantile":
        return np.asarray([np.quantile(train_z[train_family == f, f], q) for f in range(n)])
    if strategy == "zscore_k":
        return np.full(n, float(k))
    if strategy == "val_opt":
        if val_z is None or val_family is None or len(val_family) == 0:
            raise ConfigError("method.stage1.threshold.strategy=val_opt needs the labelled val split")
        truth = np.asarray(list(val_family), dtype=object)
        if not np.any(truth == OUTLIER):
            log.warning("val_opt thresholds: val holds no outliers, so every image will be accepted")
        cands = []
        for f in range(n):
            own = np.concatenate([val_z[:, f], train_z[train_family == f, f]])
            qs = np.quantile(own, np.linspace(0.0, 1.0, grid))
            cands.append(np.unique(np.concatenate([qs, [np.inf]])))
        win = np.argmin(val_z, axis=1)
        zwin = val_z[np.arange(len(val_z)), win]
        is_out = truth == OUTLIER
        fam_ok = np.asarray([families[w] for w in win], dtype=object) == truth
        best, best_acc = None, -1.0
        # exhaustive over the grid: F = 2 families -> grid² evaluations of a vectorised rule
        for taus in np.array(np.meshgrid(*cands, indexing="ij")).reshape(n, -1).T:
            called = zwin > taus[win]
            acc = float(np.mean(np.where(called, is_out, fam_ok)))
            if acc > best_acc + 1e-12:
                best, best_acc = taus, acc
        log.warning(
            "val_opt thresholds %s reach %.1f%% 3-way val accuracy; val has %.0f%% outliers while the test set "
            "reportedly has ≈45%%, so these thresholds may under-call outliers on test",
            np.round(best, 3).tolist(),
            100 * best_acc,
            100 * float(np.mean(truth == OUTLIER)),
        )
        return np.asarray(best, dtype=np.float64)
    raise ConfigError(f"method.stage1.threshold.strategy={strategy!r}; use one of {'|'.join(STRATEGIES)}")


def argmax_or_outlier(scores: np.ndarray, labels: Sequence[str], floor: float = 0.0) -> list[str]:
    """One-step PRADA decision: stack [floor, s_1..s_M]; the argmax names the model, ``outlier`` if all < floor."""
    s = np.asarray(scores, dtype=np.float64)
    stacked = np.concatenate([np.full((len(s), 1), float(floor)), s], axis=1)
    best = np.argmax(stacked, axis=1)
    return [OUTLIER if b == 0 else labels[b - 1] for b in best]


def per_variant_zscore(features: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, Mapping[str, np.ndarray]]:
    """z-score each column of ``features`` [N, V] by the mean / std of ``reference`` [M, V] (Stage 2 'zscore')."""
    mu = reference.mean(axis=0)
    sd = np.maximum(reference.std(axis=0, ddof=1), 1e-12)
    return (features - mu) / sd, {"mu": mu, "sigma": sd}
