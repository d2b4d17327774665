"""ImageNet100 (Kaggle ``ambityga/imagenet100``, merged) for continual forgetting.

Layout: ``<root>/{train,test}/<wnid>/*.JPEG`` plus ``<root>/imagenet_folder_names.txt``
listing all 1000 ImageNet wnids in the standard index order. That file is required:
it is how the 1000-way ImageNet head is sliced to these 100 classes
(``protocol.info['imagenet_ids']``). Preprocessing is Resize(256, bilinear) -> CenterCrop(224)
on the PIL image for train and test alike, as the original (``train/train_own_forget_cl.py``,
``data_mode == "imagenet100"``). Normalisation is not done here: it belongs to the weights, so
the network applies its own mean/std (:mod:`genattr.models.imagenet_vit`) and the two can
never disagree silently.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torchvision.transforms import v2

from genattr.data.forgetting import (
    ForgettingProtocol,
    class_folders,
    identity_data_root,
    protocol_from_class_folders,
)
from genattr.data.images import check_bad_image_policy
from genattr.utils.errors import DataError

log = logging.getLogger(__name__)

FOLDER_NAMES_FILE = "imagenet_folder_names.txt"
LAYOUT = f"<root>/train/<wnid>/*.JPEG, <root>/test/<wnid>/*.JPEG and <root>/{FOLDER_NAMES_FILE}"


def imagenet_transform(resize: int, crop: int) -> v2.Compose:
    """Short side to ``resize`` (PIL bilinear, as torchvision ``Resize`` on a PIL image), centre crop, [0, 1]."""
    return v2.Compose(
        [
            v2.Resize(resize, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
            v2.CenterCrop(crop),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


def imagenet_ids(root: Path, classes: list[str]) -> list[int]:
    """Global ImageNet index of each class folder, from ``imagenet_folder_names.txt``."""
    path = root / FOLDER_NAMES_FILE
    if not path.is_file():
        raise DataError(
            f"{path} does not exist; ImageNet100 needs the file listing the 1000 ImageNet wnids in index "
            "order (one per line) to slice the pretrained head"
        )
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    index = {n: i for i, n in enumerate(names)}
    unknown = [c for c in classes if c not in index]
    if unknown:
        raise DataError(f"{path} does not list the class folder(s) {unknown[:5]}; expected every wnid of train/ in it")
    return [index[c] for c in classes]


def build_imagenet100(
    *,
    name: str,
    root: str | None,
    resize: int,
    crop: int,
    scenario: Mapping[str, Any],
    on_bad_image: str = "error",
) -> ForgettingProtocol:
    """Build the ImageNet100 forgetting scenario (``conf/data/imagenet100.yaml`` ``_target_``)."""
    check_bad_image_policy(on_bad_image)
    data_root = identity_data_root(root, label="ImageNet100", expected=LAYOUT)
    classes = class_folders(data_root, LAYOUT)
    return protocol_from_class_folders(
        name=name,
        data_root=data_root,
        classes=classes,
        transform=imagenet_transform(int(resize), int(crop)),
        scenario=scenario,
        on_bad_image=on_bad_image,
        info={
            "imagenet_ids": imagenet_ids(data_root, classes),
            "resize": int(resize),
            "crop": int(crop),
            "normalisation": "in the model (the weights' own mean/std)",
            "layout": "imagenet100",
        },
    )
