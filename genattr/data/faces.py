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
from pathlib import Path
from typing import Any

import torch
from torchvision.transforms import v2

from genattr.data.forgetting import (
    ForgettingProtocol,
    build_forgetting_protocol,
    class_folders,
    read_class_folders,
)
from genattr.data.images import BadImageStats, check_bad_image_policy
from genattr.utils.errors import DataError

log = logging.getLogger(__name__)

LAYOUT = "<root>/train/<id>/*.jpg and <root>/test/<id>/*.jpg (faces_webface_112x112_sub100_train_test)"


def face_transform(image_size: int) -> v2.Compose:
    """ToTensor only (pixels in [0, 1]); a resize only when the files are not ``image_size``."""
    return v2.Compose(
        [v2.ToImage(), v2.Resize((image_size, image_size), antialias=True), v2.ToDtype(torch.float32, scale=True)]
    )


def twin_root(cache_dir: str | None, twin: Mapping[str, Any] | None, layout: str) -> Path:
    """Generate (or reuse) the SynthID twin in ``layout``; lazy import keeps real runs free of it."""
    import os

    from genattr.data.twins.identities import ensure_identity_twin

    if cache_dir is None:
        cache_dir = os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "genattr")
    return ensure_identity_twin(cache_dir, layout=layout, **dict(twin or {}))


def build_casia100(
    *,
    name: str,
    root: str | None,
    image_size: int,
    scenario: Mapping[str, Any],
    on_bad_image: str = "error",
    twin: Mapping[str, Any] | None = None,
    cache_dir: str | None = None,
) -> ForgettingProtocol:
    """Build the CASIA-100 forgetting scenario (``conf/data/casia100.yaml`` ``_target_``)."""
    check_bad_image_policy(on_bad_image)
    if root is None:
        log.warning("data.root is null: using the SYNTHETIC CASIA-100 twin (set data.root for real results)")
        source, data_root = "twin", twin_root(cache_dir, twin, "casia")
    else:
        source, data_root = "real", Path(root).expanduser()
        if not data_root.is_dir():
            raise DataError(f"data.root={root} does not exist; expected {LAYOUT}, or data.root=null for the twin")
    classes = class_folders(data_root, LAYOUT)
    stats = BadImageStats()
    transform = face_transform(int(image_size))
    sets = {
        split: read_class_folders(
            data_root,
            split=split,
            classes=classes,
            min_size=1,
            on_bad_image=on_bad_image,
            stats=stats,
            transform=transform,
        )
        for split in ("train", "test")
    }
    info = {"image_size": int(image_size), "layout": "casia"}
    if source == "twin":
        info["twin"] = dict(twin or {})
    return build_forgetting_protocol(
        name=name,
        source=source,
        root=data_root,
        class_names=classes,
        train=sets["train"],
        test=sets["test"],
        scenario=scenario,
        stats=stats,
        extra_info=info,
    )
