"""One-step PRADA score functions (Damm et al., CVPR Findings 2026; spec §7; ``src/prada/prada.py``).

Per candidate model m: s_m(x) = Σ_s w_s · mean_{tokens p in stage s} MLP(x_p), x_p = (2 − α)·ℓ_c(p) − α·ℓ_u(p), with
a 1→16→16→1 ELU MLP, a learnable α (init 1, i.e. start at the log ratio ℓ_c − ℓ_u) and per-stage weights w:
learnable and initialised to 1/S when there are S > 1 stages (VAR's scales, or ``position_groups`` > 1 on RAR),
fixed to 1 for a single stage (RAR). While training, each stage's combined input x gets Gaussian noise of
``noise``·std(x) (std over that stage's tokens of the whole batch, drawn anew at every step, not detached, as
PRADA's ``forward_single_token``). Loss: mean BCE with logits (label smoothing 0.05) + 0.1·(‖w‖₁ − 1)², AdamW
lr 1e-3 on the full batch. The parameter names and shapes are PRADA's (``alpha`` [1], ``w`` [S], ``net.{0,2,4}``),
so its released ``final.pt`` files load with ``load_state_dict``.

Class labels are unknown in the task, so the input carries K' candidate classes [N, K', L, 2]; the score of
an image is the max or log-mean-exp of the per-candidate scores (the same in training and inference).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from genattr.engine.training import optimizer_step, prepared_alone
from genattr.utils.errors import ConfigError

#: where a model's score function takes its negative images from: train images of the other variants of its
#: family, train images of the other family, and the labelled outliers of val
NEGATIVE_SOURCES = ("same_family", "other_family", "val_outliers")


def prada_negatives(raw: str | Sequence[str] | None) -> list[str]:
    """The validated ``method.prada.negatives`` (one source or a list), in canonical order."""
    items = [raw] if isinstance(raw, str) else list(raw or [])
    bad = [x for x in items if x not in NEGATIVE_SOURCES]
    if bad or not items:
        raise ConfigError(
            f"method.prada.negatives={items}: give a non-empty subset of {list(NEGATIVE_SOURCES)} (unknown: {bad})"
        )
    return [x for x in NEGATIVE_SOURCES if x in items]


class ScoreFunction(nn.Module):
    def __init__(
        self, scales: Sequence[tuple[int, int]], hidden: int = 16, aggregate: str = "max", noise: float = 0.0
    ) -> None:
        super().__init__()
        self.scales = [tuple(s) for s in scales]
        self.aggregate = aggregate
        #: training-time noise on each stage's combined input, as a fraction of its std (0 = none)
        self.noise = float(noise)
        self.noise_generator: torch.Generator | None = None
        self.alpha = nn.Parameter(torch.ones(1))
        n = len(self.scales)
        # one stage (RAR): nothing to weigh, w stays 1 (PRADA); several: learnable, init 1/S
        self.w = nn.Parameter(torch.full((n,), 1.0 / n), requires_grad=n > 1)
        self.net = nn.Sequential(
            nn.Linear(1, hidden), nn.ELU(), nn.Linear(hidden, hidden), nn.ELU(), nn.Linear(hidden, 1)
        )

    def per_candidate(self, feats: torch.Tensor) -> torch.Tensor:
        """[N, K', L, 2] -> [N, K'] scores."""
        x = (2 - self.alpha) * feats[..., 0] - self.alpha * feats[..., 1]
        stages = []
        for a, b in self.scales:
            xs = x[..., a:b]
            if self.training and self.noise > 0:
                eps = torch.randn(xs.shape, generator=self.noise_generator, dtype=xs.dtype).to(xs.device)
                xs = xs + torch.std(xs) * self.noise * eps
            stages.append(self.net(xs.unsqueeze(-1)).squeeze(-1).mean(-1))
        return (torch.stack(stages, dim=-1) * self.w).sum(-1)

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
    acc: Accelerator,
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

    ``balance`` weights positives and negatives to equal total weight. PRADA's loss is the plain mean BCE over
    250 own + 250 real images, which is exactly this weighting; one-vs-rest on this task has ≈8 negatives per
    positive, where the plain mean (``balance=False``) would tilt every score towards "not mine".

    The fit is full-batch and runs whole on the calling process (:func:`prepared_alone`): the eight score functions
    are independent, so a run on N processes fits a share of them per process, each exactly as one process would.
    (Sharding the rows instead would need the noise's per-stage std of the *whole* batch across processes.)
    """
    torch.manual_seed(seed)
    model = ScoreFunction(scales, hidden, aggregate, noise=noise)
    x = torch.as_tensor(feats, dtype=torch.float32).to(acc.device)
    y = torch.as_tensor(positive, dtype=torch.float32).to(acc.device)
    target = y * (1 - smoothing) + 0.5 * smoothing
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    weight = None
    if balance and 0 < float(y.sum()) < len(y):
        weight = torch.where(y > 0.5, 0.5 / y.sum(), 0.5 / (len(y) - y.sum()))
    model.noise_generator = torch.Generator().manual_seed(seed)
    model.train()

    def loss_fn(m: nn.Module) -> torch.Tensor:
        out = m(x).float()
        if weight is None:  # PRADA: BCEWithLogitsLoss(), the mean over images
            bce = nn.functional.binary_cross_entropy_with_logits(out, target)
        else:
            bce = nn.functional.binary_cross_entropy_with_logits(out, target, weight=weight, reduction="sum")
        return bce + weight_penalty * (model.w.abs().sum() - 1) ** 2

    history = []
    with prepared_alone(acc, model, opt) as p:
        for _ in range(int(epochs)):
            history.append(float(optimizer_step(acc, p, loss_fn)))
            if p.capped:  # trainer.max_steps
                break
    model.eval()
    model.noise_generator = None
    return model.cpu(), history


@torch.no_grad()
def score(model: ScoreFunction, feats: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    out = [
        model(torch.as_tensor(feats[s : s + batch_size], dtype=torch.float32)) for s in range(0, len(feats), batch_size)
    ]
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)
