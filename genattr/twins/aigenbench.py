"""Synthetic twin of AI-GenBench, written as a ``save_to_disk`` DatasetDict in the real schema.

What makes the benchmark interesting is time: detectors are scored on generators that
come *after* what they trained on. The twin keeps that structure. Each generator belongs
to a fingerprint **family** (transposed-conv up-sampling, spectral/diffusion smoothing,
latent-decoder tiling); families are introduced one after another over the timeline and
later generators mostly re-use an earlier family with their own variation. So a future
generator is partly detectable when its family was seen, and close to chance when it
starts a new family - as with real generator families.

Real and fake images share one content distribution (``content.render``); only the
fingerprint separates them. Names are chosen so that alphabetical generator ids are *not*
chronological, which keeps the protocol honest about ids vs time.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from genattr.twins.cache import cached_twin
from genattr.twins.content import name_seed, random_style, render
from genattr.twins.fingerprints import (
    Fingerprint,
    checkerboard,
    colour_stats,
    fixed_tile,
    grating,
    resample,
    tile_noise,
)
from genattr.twins.spec import Twin, plain
from genattr.utils.errors import ConfigError

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
FAMILIES = ("upconv", "spectral", "latent")
#: Invented generator names; their alphabetical order deliberately differs from release order.
_NAMES = (
    "Quill",
    "Ember",
    "Zephyr",
    "Basalt",
    "Nimbus",
    "Kestrel",
    "Aurora",
    "Tundra",
    "Lumen",
    "Cobalt",
    "Vesper",
    "Heron",
    "Onyx",
    "Juniper",
    "Sable",
    "Dune",
)
_START = dt.date(2017, 3, 1)


def generator_plan(n_generators: int, n_families: int = len(FAMILIES)) -> list[tuple[str, str, dt.date]]:
    """``(name, family, release date)`` in release order.

    Family f is introduced at generator ``f * n / n_families``; every other generator
    re-uses one of the families introduced so far, in rotation.
    """
    if not 1 <= n_generators <= len(_NAMES) * 4:
        raise ConfigError(f"data.twin.n_generators must be in 1..{len(_NAMES) * 4}, got {n_generators}")
    n_families = max(1, min(n_families, len(FAMILIES), n_generators))
    intro = {int(f * n_generators / n_families): f for f in range(n_families)}
    plan = []
    introduced: list[int] = []
    for i in range(n_generators):
        if i in intro:
            fam = intro[i]
            introduced.append(fam)
        else:
            fam = introduced[i % len(introduced)]
        name = f"{_NAMES[i % len(_NAMES)]}{'' if i < len(_NAMES) else i // len(_NAMES) + 1}-{FAMILIES[fam]}"
        plan.append((name, FAMILIES[fam], _START + dt.timedelta(days=75 * i)))
    return plan


def family_fingerprint(name: str, family: str) -> Fingerprint:
    """A family's shared trace with this generator's own parameters."""
    rng = np.random.default_rng(name_seed("aigenbench-twin", name))
    colour = tuple(float(c) for c in rng.uniform(0.3, 1.0, 3))
    if family == "upconv":
        ops = (
            partial(resample, factor=2, mode="nearest"),
            partial(checkerboard, period=int(rng.choice([2, 4])), amp=float(rng.uniform(0.05, 0.08)), colour=colour),
        )
        return Fingerprint(name, "transposed-conv up-sampling", ops, gain=1.6)
    if family == "spectral":
        ops = (
            partial(resample, factor=2, mode="linear"),
            partial(
                grating, freq=float(rng.uniform(0.18, 0.3)), angle=float(rng.uniform(0, 180)), amp=0.05, colour=colour
            ),
        )
        return Fingerprint(name, "smooth decoder with a spectral peak", ops, gain=1.6)
    if family == "latent":
        ops = (
            partial(tile_noise, tile=fixed_tile(f"latent/{name}", 8), amp=float(rng.uniform(0.035, 0.05))),
            partial(colour_stats, saturation=float(rng.uniform(1.15, 1.3))),
        )
        return Fingerprint(name, "8-px latent-decoder tiling", ops)
    raise ConfigError(f"unknown twin family {family!r}; expected one of {FAMILIES}")


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _render(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """``n`` scenes in [0, 1], a new random style every 8 images."""
    parts = [render(rng, min(8, n - i), size, random_style(rng)) for i in range(0, n, 8)]
    return np.concatenate(parts) if parts else np.zeros((0, size, size, 3), np.float32)


def _split_rows(
    plan: list[tuple[str, str, dt.date]], n_per_gen: int, split: str, size: int, seed: int, strength: float
) -> dict[str, list[Any]]:
    cols: dict[str, list[Any]] = {k: [] for k in _COLUMNS}

    def add(arr: np.ndarray, generator: str, file_id: str, origin: str) -> None:
        cols["image"].append({"bytes": _png(arr), "path": None})
        cols["height"].append(arr.shape[0])
        cols["width"].append(arr.shape[1])
        cols["label"].append(0 if generator == "" else 1)
        cols["generator"].append(generator)
        cols["file_id"].append(file_id)
        cols["description"].append("")
        cols["positive_prompt"].append("")
        cols["negative_prompt"].append("")
        cols["conditioning"].append("")
        cols["origin_dataset"].append(origin)
        cols["paired_real_images"].append([])

    for name, family, _ in plan:  # fakes first, as in the real dataset
        rng = np.random.default_rng(name_seed("aigenbench-twin", seed, split, name))
        fp = family_fingerprint(name, family)
        imgs = np.clip(fp.apply(_render(rng, n_per_gen, size), rng, strength), 0, 1)
        for i, arr in enumerate((imgs * 255 + 0.5).astype(np.uint8)):
            add(arr, name, f"Twin/{name}/{split}/{i:05d}", f"twin-{family}")
    rng = np.random.default_rng(name_seed("aigenbench-twin", seed, split, "real"))
    reals = np.clip(_render(rng, n_per_gen * len(plan), size), 0, 1)
    for i, arr in enumerate((reals * 255 + 0.5).astype(np.uint8)):
        add(arr, "", f"TwinReal/{split}/{i:05d}", "twin-real")
    return cols


_COLUMNS = (
    "image",
    "height",
    "width",
    "label",
    "generator",
    "file_id",
    "description",
    "positive_prompt",
    "negative_prompt",
    "conditioning",
    "origin_dataset",
    "paired_real_images",
)


def aigenbench_features() -> Any:
    """The column types of the released dataset (``DEEPFAKE_DATASET_FEATURES``)."""
    from datasets import ClassLabel, Features, Value
    from datasets import Image as HFImage
    from datasets import List as HFList

    return Features(
        {
            "image": HFImage(),
            "height": Value("uint32"),
            "width": Value("uint32"),
            "label": ClassLabel(names=["real", "fake"]),
            "generator": Value("string"),
            "file_id": Value("string"),
            "description": Value("string"),
            "positive_prompt": Value("string"),
            "negative_prompt": Value("string"),
            "conditioning": Value("string"),
            "origin_dataset": Value("string"),
            "paired_real_images": HFList(Value("string")),
        }
    )


def write_aigenbench(folder: Path, splits: dict[str, dict[str, list[Any]]]) -> None:
    """Write column dicts per split as a ``DatasetDict`` with ``save_to_disk`` (real schema)."""
    import datasets

    features = aigenbench_features()
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        datasets.DatasetDict(
            {k: datasets.Dataset.from_dict(v, features=features) for k, v in splits.items()}
        ).save_to_disk(str(folder))
    finally:
        if bars:
            datasets.enable_progress_bars()


def ensure_aigenbench_twin(
    cache_dir: str | Path,
    *,
    n_windows: int = 4,
    generators_per_window: int = 2,
    n_families: int = 3,
    image_size: int = 64,
    n_train: int = 48,
    n_val: int = 24,
    seed: int = 0,
    strength: float = 1.0,
) -> Path:
    """Return the twin folder (DatasetDict + ``generators.csv``), generating it once.

    ``n_train`` / ``n_val`` are fakes per generator; each split holds as many reals as
    fakes. Written to a temporary sibling and renamed, so a half-written twin never
    sits behind the cache key.
    """
    if min(n_windows, generators_per_window, image_size, n_train, n_val) < 1:
        raise ConfigError("data.twin needs positive n_windows, generators_per_window, image_size, n_train and n_val")
    params = {
        "n_windows": int(n_windows),
        "generators_per_window": int(generators_per_window),
        "n_families": int(n_families),
        "image_size": int(image_size),
        "n_train": int(n_train),
        "n_val": int(n_val),
        "seed": int(seed),
        "strength": float(strength),
        "generator_version": GENERATOR_VERSION,
    }
    plan = generator_plan(n_windows * generators_per_window, n_families)

    def generate(tmp: Path) -> dict[str, Any]:
        write_aigenbench(
            tmp,
            {
                split: _split_rows(plan, n, split, image_size, seed, strength)
                for split, n in (("train", n_train), ("validation", n_val))
            },
        )
        lines = ["# AI-GenBench twin timeline (written by genattr)", "generator,release_date"]
        lines += [f"{name},{date.isoformat()}" for name, _, date in plan]
        (tmp / "generators.csv").write_text("\n".join(lines) + "\n")
        return {"generators": [{"name": n, "family": f, "date": d.isoformat()} for n, f, d in plan]}

    return cached_twin(cache_dir, "aigenbench_twin", params, generate)


def aigenbench_twin(
    *, data: Mapping[str, Any], model: Mapping[str, Any], params: Mapping[str, Any], cache_dir: Path
) -> Twin:
    """``conf/data/aigenbench.yaml`` ``twin._target_``: a ``save_to_disk`` folder and its own timeline table."""
    root = ensure_aigenbench_twin(cache_dir, **params)
    return Twin(root=root, info=plain(params), data={"generators": str(root / "generators.csv")})
