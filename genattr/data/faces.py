"""CASIA-100 (``faces_webface_112x112_sub100_train_test``) for continual forgetting.

Layout (``specs/gslora.md`` section 5): ``<root>/{train,test}/<id>/*.jpg``, label = index of
the sorted identity folder (torchvision ``ImageFolder`` order), read here with our own
PIL loader. Pixels go to the model in [0, 1] without normalisation or augmentation,
exactly as the Face Transformer was trained. ``root: null`` builds the SynthID twin in
this same layout and reads it with this loader.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
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

log = logging.getLogger(__name__)

LAYOUT = "<root>/train/<id>/*.jpg and <root>/test/<id>/*.jpg (faces_webface_112x112_sub100_train_test)"


def face_transform(image_size: int) -> v2.Compose:
    """ToTensor only (pixels in [0, 1]); a resize only when the files are not ``image_size``."""
    return v2.Compose(
        [v2.ToImage(), v2.Resize((image_size, image_size), antialias=True), v2.ToDtype(torch.float32, scale=True)]
    )


def build_casia100(
    *,
    name: str,
    root: str | None,
    image_size: int,
    scenario: Mapping[str, Any],
    on_bad_image: str = "error",
) -> ForgettingProtocol:
    """Build the CASIA-100 forgetting scenario (``conf/data/casia100.yaml`` ``_target_``)."""
    check_bad_image_policy(on_bad_image)
    data_root = identity_data_root(root, label="CASIA-100", expected=LAYOUT)
    return protocol_from_class_folders(
        name=name,
        data_root=data_root,
        classes=class_folders(data_root, LAYOUT),
        transform=face_transform(int(image_size)),
        scenario=scenario,
        on_bad_image=on_bad_image,
        info={"image_size": int(image_size), "layout": "casia"},
    )
