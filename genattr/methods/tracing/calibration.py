"""Stage 2 calibrators: larger variants assign higher likelihood to EVERYTHING, so a raw argmax over variants
is biased towards the biggest model (spec §6). Two calibrations:

* ``zscore``: per variant, z-score the guided log-likelihood by its mean / std over the family's train images
  (all variants), then take the argmax;
* ``logreg``: scikit-learn logistic regression on the per-variant 4-vectors of summaries (logp_cond,
  logp_uncond, logp_guided, rank), concatenated over the family's variants, trained on the family's train split.

Fitted calibrators are plain arrays (saved as JSON / safetensors, never pickled).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from genattr.methods.tracing.likelihood import SUMMARY_FEATURES
from genattr.utils.errors import ConfigError

CALIBRATIONS = ("zscore", "logreg")


@dataclass
class VariantCalibrator:
    """Maps [N, V, F] summary features (columns of ``SUMMARY_FEATURES``) of one family to variant indices."""

    kind: str
    params: dict[str, Any]
    features: tuple[str, ...] = SUMMARY_FEATURES[:4]

    def _cols(self) -> list[int]:
        return [SUMMARY_FEATURES.index(f) for f in self.features]

    def scores(self, feats: np.ndarray) -> np.ndarray:
        """Calibrated per-variant scores [N, V] (higher = more likely that variant)."""
        if self.kind == "zscore":
            g = feats[:, :, SUMMARY_FEATURES.index("logp_guided")]
            return (g - np.asarray(self.params["mu"])) / np.asarray(self.params["sigma"])
        x = feats[:, :, self._cols()].reshape(len(feats), -1)
        x = (x - np.asarray(self.params["mean"])) / np.asarray(self.params["scale"])
        return x @ np.asarray(self.params["coef"]).T + np.asarray(self.params["intercept"])

    def predict(self, feats: np.ndarray) -> np.ndarray:
        return np.argmax(self.scores(feats), axis=1)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "features": list(self.features), "params": _jsonable(self.params)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> VariantCalibrator:
        return cls(d["kind"], d["params"], tuple(d["features"]))


def _jsonable(p: dict[str, Any]) -> dict[str, Any]:
    return {k: (np.asarray(v).tolist() if isinstance(v, np.ndarray) else v) for k, v in p.items()}


def fit_calibrator(
    kind: str,
    feats: np.ndarray,
    variant: np.ndarray,
    *,
    features: Sequence[str] = SUMMARY_FEATURES[:4],
    C: float = 1.0,
    seed: int = 0,
) -> VariantCalibrator:
    """Fit on train features [N, V, F] with the true variant index [N] of each image."""
    if kind == "zscore":
        g = feats[:, :, SUMMARY_FEATURES.index("logp_guided")]
        return VariantCalibrator(
            "zscore", {"mu": g.mean(0), "sigma": np.maximum(g.std(0, ddof=1), 1e-12)}, tuple(features)
        )
    if kind != "logreg":
        raise ConfigError(f"method.stage2.calibration={kind!r}; use one of {'|'.join(CALIBRATIONS)}")
    unknown = sorted(set(features) - set(SUMMARY_FEATURES))
    if unknown:
        raise ConfigError(f"method.stage2.features has unknown entries {unknown}; valid: {list(SUMMARY_FEATURES)}")
    cal = VariantCalibrator("logreg", {}, tuple(features))
    x = feats[:, :, cal._cols()].reshape(len(feats), -1)
    scaler = StandardScaler().fit(x)
    lr = LogisticRegression(C=C, max_iter=2000, random_state=seed).fit(scaler.transform(x), variant)
    coef, intercept = lr.coef_, lr.intercept_
    n_var = feats.shape[1]
    if len(lr.classes_) != n_var:  # a variant absent from train: give it -inf so it is never predicted
        full_c, full_i = np.zeros((n_var, x.shape[1])), np.full(n_var, -1e9)
        if coef.shape[0] == 1:  # binary problem: sklearn keeps one row
            coef, intercept = np.vstack([-coef, coef]) / 2, np.array([-intercept[0], intercept[0]]) / 2
        full_c[lr.classes_], full_i[lr.classes_] = coef, intercept
        coef, intercept = full_c, full_i
    cal.params = {"mean": scaler.mean_, "scale": scaler.scale_, "coef": coef, "intercept": intercept}
    return cal
