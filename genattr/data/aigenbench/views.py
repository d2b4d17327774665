"""torch ``Dataset`` views of a split: fixed-augmented training copies and scored evaluation crops.

Training (``PreAugmentedDataset`` in the original): ``len = N * augmentation_factor``;
index i is copy ``i % am`` of element ``i // am``, and its deterministic augmentation is
seeded by (copy, element) only, element being the image's position in the window's
training list. So within a window each image has exactly ``am`` fixed variants, identical
in every epoch and run. They are *not* identical across windows: the original's
cumulative list puts the newest window first, so an earlier image's position, hence its
variants, change every time a window is added (``method.train_variants``). Only rot90 /
flip and the size adaptation vary, drawn from a stream keyed by (run seed, window,
index) so that a resumed run sees the same batches.

Evaluation: position p of the (shuffled, balanced) validation set is augmented with seed
4321 + p, so every window scores exactly the same pixels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from genattr.data.aigenbench.augment import Pipeline, fixed_seed, random_part
from genattr.data.aigenbench.crops import eval_crops, to_model_input, train_crop
from genattr.data.aigenbench.dataset import DetectionSplit

EVAL_SEED = 4321


class FixedAugmentedTrainSet(Dataset):
    """``augmentation_factor`` fixed variants of every training image of a window.

    ``positions`` is the window's training list in order; position j of copy c is seeded
    with ``fixed_seed(c, j)``.
    """

    def __init__(
        self,
        split: DetectionSplit,
        positions: np.ndarray,
        *,
        augmentation_factor: int,
        pipeline: Pipeline,
        crop: str,
        size: int,
        stream: tuple[int, ...] = (0,),
        cache: dict[tuple[int, int, int], np.ndarray] | None = None,
    ) -> None:
        self.split, self.positions = split, np.asarray(positions, dtype=np.int64)
        self.am, self.pipeline, self.crop, self.size = int(augmentation_factor), pipeline, crop, int(size)
        self.stream = tuple(int(s) for s in stream)
        self.cache = cache  # (copy, element, row) -> uint8 HWC; only for in-process loading

    def __len__(self) -> int:
        return len(self.positions) * self.am

    def fixed_view(self, index: int) -> Image.Image:
        """The deterministic augmentation of item ``index`` (before rot90 / flip / resize)."""
        copy, element = index % self.am, index // self.am
        row = int(self.split.rows[self.positions[element]])
        key = (copy, element, row)
        if self.cache is not None and key in self.cache:
            return Image.fromarray(self.cache[key])
        img = self.pipeline(self.split.images(row), np.random.default_rng(fixed_seed(copy, element)))
        if self.cache is not None:
            self.cache[key] = np.asarray(img)
        return img

    def __getitem__(self, index: int) -> tuple[torch.Tensor, float, int, int]:
        pos = int(self.positions[index // self.am])
        rng = np.random.default_rng((*self.stream, index))
        img = train_crop(random_part(self.fixed_view(index), rng), self.crop, self.size, rng)
        return (
            to_model_input(img),
            float(self.split.labels[pos]),
            int(self.split.generator_ids[pos]),
            int(self.split.rows[pos]),
        )


class EvalSet(Dataset):
    """The mandatory pipeline + the evaluation crops of every validation image."""

    def __init__(
        self, split: DetectionSplit, *, pipeline: Pipeline, crop: str, size: int, cache: dict[int, Any] | None = None
    ) -> None:
        self.split, self.pipeline, self.crop, self.size = split, pipeline, crop, int(size)
        self.cache = cache  # position -> stacked crops tensor; only for in-process loading

    def __len__(self) -> int:
        return len(self.split)

    def crops(self, position: int) -> torch.Tensor:
        if self.cache is not None and position in self.cache:
            return self.cache[position]
        image = self.split.images(int(self.split.rows[position]))
        img = self.pipeline(image, np.random.default_rng(EVAL_SEED + position))
        out = torch.stack([to_model_input(c) for c in eval_crops(img, self.crop, self.size)])
        if self.cache is not None:
            self.cache[position] = out
        return out

    def __getitem__(self, position: int) -> dict[str, Any]:
        return {
            "crops": self.crops(position),
            "label": int(self.split.labels[position]),
            "generator_id": int(self.split.generator_ids[position]),
            "identifier": int(self.split.rows[position]),
            "position": position,
        }


def collate_crops(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack a variable number of crops per image; ``crop_to_image_index`` is batch-local."""
    crops = [it["crops"] for it in items]
    return {
        "crops": torch.cat(crops),
        "crop_to_image_index": torch.repeat_interleave(torch.arange(len(items)), torch.tensor([len(c) for c in crops])),
        "label": torch.tensor([it["label"] for it in items]),
        "generator_id": torch.tensor([it["generator_id"] for it in items]),
        "identifier": torch.tensor([it["identifier"] for it in items]),
        "position": torch.tensor([it["position"] for it in items]),
    }
