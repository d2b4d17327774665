"""Synthetic twin of CDDB, written in CDDB's own on-disk layout.

The twin is read by the real CDDB loader (DESIGN principle 1), so every path of
``build_cddb`` is exercised without the 30 GB download. Each task name is a domain
(``content.domain_style``) and a generator (``fingerprints.TRACES``); real and fake
images share the domain's content distribution, so only the fingerprint separates them.

The output is a cache keyed by a hash of the parameters and ``GENERATOR_VERSION``:
bump the version whenever the bytes a parameter set produces change.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from genattr.data.cddb import CDDB_TASKS, SUBCATEGORIES
from genattr.twins.backbone import twin_backbone_file
from genattr.twins.cache import cached_twin
from genattr.twins.content import domain_style, name_seed, render, to_uint8
from genattr.twins.fingerprints import TRACES
from genattr.twins.spec import Twin, plain
from genattr.utils.errors import ConfigError

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2
_CHUNK = 64  # images rendered per numpy batch; bounds memory at large image sizes


def _split_counts(n: int, parts: int) -> list[int]:
    """Spread ``n`` images over ``parts`` sub-categories as evenly as possible."""
    return [n // parts + (i < n % parts) for i in range(parts)]


def _write_class(
    folder: Path,
    *,
    task: str,
    sub: str,
    split: str,
    fake: bool,
    n: int,
    size: int,
    seed: int,
    strength: float,
) -> None:
    """Render ``n`` images of one (task, sub-category, split, class) into ``folder``."""
    folder.mkdir(parents=True)
    style = domain_style(task, sub) if sub else domain_style(task)
    key = name_seed(task, sub, split, int(fake))
    for start in range(0, n, _CHUNK):
        rng = np.random.default_rng([seed, key, start])
        batch = render(rng, min(_CHUNK, n - start), size, style)
        if fake:
            batch = TRACES[task].apply(batch, rng, strength)
        for k, image in enumerate(to_uint8(batch), start):
            Image.fromarray(image).save(folder / f"{task}_{k:05d}.png", compress_level=1)


def _generate(out: Path, *, tasks: Sequence[str], splits: dict[str, int], **render_kw: Any) -> dict:
    """Write every task into ``out`` and return the per-class counts for the manifest."""
    counts: dict[str, dict] = {}
    for task in tasks:
        subs = SUBCATEGORIES.get(task, [""])
        counts[task] = {}
        for split, n in splits.items():
            for sub, n_sub in zip(subs, _split_counts(n, len(subs)), strict=True):
                base = out / task / split / sub if sub else out / task / split
                for fake in (False, True):
                    cls = "1_fake" if fake else "0_real"
                    _write_class(
                        base / cls,
                        task=task,
                        sub=sub,
                        split=split,
                        fake=fake,
                        n=n_sub,
                        **render_kw,
                    )
            counts[task][split] = {"0_real": n, "1_fake": n}
    return counts


def ensure_cddb_twin(
    cache_dir: str | Path,
    *,
    image_size: int = 40,
    n_train: int = 96,
    n_val: int = 48,
    seed: int = 0,
    tasks: Sequence[str] = CDDB_TASKS,
    strength: float = 1.0,
) -> Path:
    """Return the twin folder for these parameters, generating it once if needed.

    ``n_train`` / ``n_val`` are per class (real and fake each) per task; ``strength``
    scales every fingerprint (1.0 = calibrated default, 0 = fakes drawn like reals, a
    negative control). Generation happens in a temporary sibling folder that is
    renamed into place, so a crash or a concurrent run never leaves a half-written
    twin behind the cache key.
    """
    tasks = [str(t) for t in tasks]
    unknown = sorted(set(tasks) - set(CDDB_TASKS))
    if unknown:
        raise ConfigError(f"unknown CDDB twin task(s) {unknown}; valid: {', '.join(CDDB_TASKS)}")
    if min(image_size, n_train, n_val) < 1:
        raise ConfigError(f"data.twin needs positive image_size/n_train/n_val, got {image_size}/{n_train}/{n_val}")
    most_subs = max(len(SUBCATEGORIES.get(t, [""])) for t in tasks)
    if min(n_train, n_val) < most_subs:
        raise ConfigError(
            f"data.twin n_train={n_train} / n_val={n_val} must be >= {most_subs}, "
            "so that every CDDB sub-category folder of the twin gets at least one image per class"
        )
    params = {
        "image_size": int(image_size),
        "n_train": int(n_train),
        "n_val": int(n_val),
        "seed": int(seed),
        "tasks": tasks,
        "strength": float(strength),
        "generator_version": GENERATOR_VERSION,
    }

    def generate(tmp: Path) -> dict[str, Any]:
        counts = _generate(
            tmp,
            tasks=tasks,
            splits={"train": params["n_train"], "val": params["n_val"]},
            size=params["image_size"],
            seed=params["seed"],
            strength=params["strength"],
        )
        return {
            "subcategories": {t: SUBCATEGORIES.get(t, []) for t in tasks},
            "fingerprints": {t: TRACES[t].description for t in tasks},
            "counts": counts,
        }

    return cached_twin(cache_dir, "cddb_twin", params, generate)


def cddb_twin(*, data: Mapping[str, Any], model: Mapping[str, Any], params: Mapping[str, Any], cache_dir: Path) -> Twin:
    """``conf/data/cddb_*.yaml`` ``twin._target_``: the twin tree, and a twin-pretrained backbone when asked.

    The twin is cropped like CDDB, never resized, so its images must be at least ``data.crop``. With
    ``model.twin_pretrain.enabled`` (and neither ``model.weights`` nor ``model.pretrained``) the backbone is
    pretrained once on the separate synthetic pretext (:mod:`genattr.twins.backbone`) and handed to the model as
    ``model.weights``, as a released checkpoint would be. The run's ``config.yaml`` and MLflow params are written
    before the twin is built, so the file is also named in the twin's info (``data/info.json["twin"]["backbone"]``).
    """
    if int(params["image_size"]) < int(data["crop"]):
        raise ConfigError(
            f"data.crop={data['crop']} is larger than the twin's image_size={params['image_size']}; "
            "set data.twin.image_size >= data.crop (the twin is cropped like CDDB, never resized)"
        )
    root = ensure_cddb_twin(cache_dir, **params)
    weights: dict[str, Any] = {}
    info = plain(params)
    recipe = dict(model.get("twin_pretrain") or {})
    if recipe.get("enabled") and model.get("weights") is None and not model.get("pretrained"):
        weights = {"weights": str(twin_backbone_file(model, recipe, cache_dir))}
        info["backbone"] = {"weights": weights["weights"], "twin_pretrain": plain(recipe)}
    return Twin(root=root, info=info, model=weights)
