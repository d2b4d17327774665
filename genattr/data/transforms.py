"""Image transforms of the LoRAX / CDDB protocol.

LoRAX crops at native resolution, without resizing, flipping or padding, and
normalises with mean = std = 0.5 rather than ImageNet statistics; resizing would
blur exactly the high-frequency generator traces the task is about.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

_HALF = [0.5, 0.5, 0.5]


def _to_normalised_tensor() -> list[v2.Transform]:
    """PIL -> float in [0, 1] -> [-1, 1] per channel (ToTensor + Normalize(0.5, 0.5))."""
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(_HALF, _HALF),
    ]


def train_transform(crop: int) -> v2.Compose:
    """Random ``crop`` x ``crop`` patch; fails on smaller images instead of padding."""
    return v2.Compose([v2.RandomCrop(crop), *_to_normalised_tensor()])


def test_transform(crop: int) -> v2.Compose:
    """Central ``crop`` x ``crop`` patch: the deterministic ``train_transform``."""
    return v2.Compose([v2.CenterCrop(crop), *_to_normalised_tensor()])


# Named ``test_*`` for symmetry with ``train_transform``; keep pytest from collecting it.
test_transform.__test__ = False  # type: ignore[attr-defined]
