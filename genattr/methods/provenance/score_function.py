"""One-step PRADA score functions (Damm et al., CVPR Findings 2026; spec §7).

Per candidate model m: s_m(x) = Σ_s w_s · mean_{tokens p in scale s} MLP((2 − α)·ℓ_c(p) − α·ℓ_u(p)), with a
1→16→16→1 ELU MLP, a learnable α (init 1, i.e. start at the log ratio ℓ_c − ℓ_u) and learnable per-scale
weights w (init 1/S; VAR S = #scales, RAR S = 1). Trained with BCE (label smoothing 0.05) + 0.1·(‖w‖₁ − 1)²,
Gaussian input noise of 0.1·std of each feature, AdamW lr 1e-3 on the full batch.

Class labels are unknown in the task, so the input carries K' candidate classes [N, K', L, 2]; the score of
an image is the max or log-mean-exp of the per-candidate scores (the same in training and inference).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from genattr.utils.errors import ConfigError

#: where a model's score function takes its negative images from: train images of the other variants of its
#: family, train images of the other family, and the labelled outliers of val
NEGATIVE_SOURCES = ("same_family", "other_family", "val_outliers")


def prada_negatives(cfg: Mapping[str, object]) -> list[str]:
    """The validated ``method.prada.negatives`` list (default: all three sources, one-vs-rest)."""
    raw = cfg.get("negatives", list(NEGATIVE_SOURCES))
    items = [raw] if isinstance(raw, str) else list(raw or [])  # type: ignore[call-overload]
    bad = [x for x in items if x not in NEGATIVE_SOURCES]
    if bad or not items:
        raise ConfigError(
            f"method.prada.negatives={items}: give a non-empty subset of {list(NEGATIVE_SOURCES)} (unknown: {bad})"
        )
    return [x for x in NEGATIVE_SOURCES if x in items]


class ScoreFunction(nn.Module):
    def __init__(self, scales: Sequence[tuple[int, int]], hidden: int = 16, aggregate: str = "max") -> None:
        super().__init__()
        self.scales = [tuple(s) for s in scales]
        self.aggregate = aggregate
        self.mlp = nn.Sequential(
            nn.Linear(1, hidden), nn.ELU(), nn.Linear(hidden, hidden), nn.ELU(), nn.Linear(hidden, 1)
        )
        self.alpha = nn.Parameter(torch.tensor(1.0))
        self.w = nn.Parameter(torch.full((len(self.scales),), 1.0 / len(self.scales)))

    def per_candidate(self, feats: torch.Tensor) -> torch.Tensor:
        """[N, K', L, 2] -> [N, K'] scores."""
        x = (2 - self.alpha) * feats[..., 0] - self.alpha * feats[..., 1]
        t = self.mlp(x.unsqueeze(-1)).squeeze(-1)
        per_scale = torch.stack([t[..., a:b].mean(-1) for a, b in self.scales], dim=-1)
        return (per_scale * self.w).sum(-1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        s = self.per_candidate(feats)
        if s.shape[1] == 1:
            return s[:, 0]
        if self.aggregate == "max":
            return s.max(dim=1).values
        return torch.logsumexp(s, dim=1) - float(np.log(s.shape[1]))


def fit_score_function(
    feats: np.ndarray,
    positive: np.ndarray,
    scales: Sequence[tuple[int, int]],
    *,
    epochs: int = 3000,
    lr: float = 1e-3,
    smoothing: float = 0.05,
    weight_penalty: float = 0.1,
    noise: float = 0.1,
    hidden: int = 16,
    aggregate: str = "max",
    balance: bool = True,
    seed: int = 0,
) -> tuple[ScoreFunction, list[float]]:
    """Train one score function on [N, K', L, 2] features with binary targets; returns it and the loss curve.

    ``balance`` weights positives and negatives to equal total weight: PRADA trains on 250 + 250 images, while
    one-vs-rest on this task has ≈8 negatives per positive, which otherwise pushes every score below 0.
    """
    torch.manual_seed(seed)
    model = ScoreFunction(scales, hidden, aggregate)
    x = torch.as_tensor(feats, dtype=torch.float32)
    y = torch.as_tensor(positive, dtype=torch.float32)
    target = y * (1 - smoothing) + 0.5 * smoothing
    std = x.reshape(-1, 2).std(dim=0) * noise  # per feature (ℓ_c, ℓ_u)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    if balance and 0 < float(y.sum()) < len(y):
        weight = torch.where(y > 0.5, 0.5 / y.sum(), 0.5 / (len(y) - y.sum()))
    else:
        weight = torch.full_like(y, 1.0 / len(y))
    g = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(int(epochs)):
        xin = x + torch.randn(x.shape, generator=g) * std if noise > 0 else x
        bce = nn.functional.binary_cross_entropy_with_logits(model(xin), target, weight=weight, reduction="sum")
        loss = bce + weight_penalty * (model.w.abs().sum() - 1) ** 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    model.eval()
    return model, history


@torch.no_grad()
def score(model: ScoreFunction, feats: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    out = [
        model(torch.as_tensor(feats[s : s + batch_size], dtype=torch.float32)) for s in range(0, len(feats), batch_size)
    ]
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)
