"""Candidate classes of the images the likelihood stages score (``class_source``; see ``classes.py``).

Computed once per split and kept in the state (``cand_<split>``), so the two-stage ``variant`` stage and the
one-step ``features`` stage never run the classifier twice; the top-k sweep is shared among processes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from genattr.methods.base import RunContext
from genattr.methods.tracing import classes as cls_mod
from genattr.methods.tracing.assets import TaskAssets
from genattr.methods.tracing.parallel import sweep
from genattr.methods.tracing.settings import TracerSettings
from genattr.methods.tracing.state import TracerState

SPLITS = ("train", "val", "test")


def trained_classifier(settings: TracerSettings, state: TracerState, device: torch.device) -> nn.Module | None:
    """The classifier of the ``models`` stage (None unless ``class_source=topk``)."""
    if settings.class_source != "topk":
        return None
    model = cls_mod.build_classifier(settings.classifier, int(state.meta["num_classes"]))
    model.load_state_dict(state.weights("classifier"))
    return model.to(device).eval()


def class_candidates(
    settings: TracerSettings,
    state: TracerState,
    ctx: RunContext,
    model: nn.Module | None,
    n: int,
    images: Callable[[], torch.Tensor],
    oracle: np.ndarray | None,
    *,
    what: str,
    counts: Counter[str],
) -> np.ndarray:
    """[N, K'] candidate classes of ``n`` images for ``class_source`` (``oracle``: their true classes, −1 = none);
    ``images()`` is only read for top-k."""
    meta, acc, bs = state.meta, ctx.accelerator, settings.batch_size
    topk = None
    if model is not None:
        k = min(settings.topk, int(meta["num_classes"]))
        x = images()
        out, rows = sweep(
            acc,
            n,
            bs,
            lambda sl: {"topk": cls_mod.topk_classes(model, x[sl], k, batch_size=bs, device=acc.device)},
            desc=f"top-{k} classes {what}",
        )
        topk = out["topk"]
        counts["classified_images"] += rows
    return cls_mod.candidate_classes(
        settings.class_source,
        n,
        num_classes=int(meta["num_classes"]),
        null_class=int(meta["null_class"]),
        oracle=oracle,
        topk=topk,
    )


def split_candidates(
    settings: TracerSettings, assets: TaskAssets, state: TracerState, ctx: RunContext, counts: Counter[str]
) -> dict[str, np.ndarray]:
    """Candidate classes per split ([N, K']), computed once and kept in the state."""
    model = trained_classifier(settings, state, assets.device)
    for split in SPLITS:
        key = f"cand_{split}"
        if key not in state.arrays:
            state.arrays[key] = class_candidates(
                settings,
                state,
                ctx,
                model,
                len(assets.protocol.split(split)),
                lambda split=split: assets.images(split),
                assets.oracle_classes(split),
                what=split,
                counts=counts,
            )
    return {split: state.arrays[f"cand_{split}"] for split in SPLITS}
