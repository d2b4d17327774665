"""Size adaptation between the augmented image and the model input, and CLIP normalisation.

``resize`` squashes to a square (aspect ratio is *not* kept, as in the original code);
``multicrop`` scores the five 224 crops of an image and fuses their sigmoid
probabilities by their mean, falling back to one centre crop when a side is <= the
crop size. Every backbone gets CLIP's mean / std, DINOv2 included.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from genattr.utils.errors import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TRAIN_CROPS = ("resize", "random_crop", "center_crop", "as_is")
EVAL_CROPS = ("resize", "crop", "multicrop", "as_is")


def check_crop(kind: str, strategy: str) -> None:
    valid = TRAIN_CROPS if kind == "train" else EVAL_CROPS
    if strategy not in valid:
        raise ConfigError(f"method.{kind}_crop={strategy!r}; expected one of {list(valid)}")


def train_crop(img: Image.Image, strategy: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One training view of side ``size`` (``as_is`` keeps the image)."""
    if strategy == "resize":
        return F.resize(img, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    if strategy == "random_crop":
        w, h = img.size
        if w < size or h < size:  # RandomCrop(pad_if_needed=True), constant zero padding
            pad_w, pad_h = max(0, size - w), max(0, size - h)
            img = F.pad(img, [pad_w, pad_h, pad_w, pad_h], fill=0)
            w, h = img.size
        top, left = int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1))
        return F.crop(img, top, left, size, size)
    if strategy == "center_crop":
        return F.center_crop(img, [size, size])
    if strategy == "as_is":
        return img
    raise ConfigError(f"method.train_crop={strategy!r}; expected one of {list(TRAIN_CROPS)}")


def eval_crops(img: Image.Image, strategy: str, size: int) -> list[Image.Image]:
    """The views an image is scored on; their scores are fused by the mean sigmoid."""
    if strategy == "resize":
        return [F.resize(img, [size, size], antialias=True)]
    if strategy == "crop":
        return [F.center_crop(img, [size, size])]
    if strategy == "multicrop":
        if min(img.size) <= size:
            return [F.center_crop(img, [size, size])]
        return list(F.five_crop(img, [size, size]))
    if strategy == "as_is":
        return [img]
    raise ConfigError(f"method.eval_crop={strategy!r}; expected one of {list(EVAL_CROPS)}")


def to_model_input(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float CHW normalised with the CLIP statistics."""
    x = F.to_dtype(F.pil_to_tensor(img), torch.float32, scale=True)
    return F.normalize(x, list(CLIP_MEAN), list(CLIP_STD))
