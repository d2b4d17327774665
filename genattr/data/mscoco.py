"""MSCOCO text-to-image attribution inputs in the AbU release format (``specs/unlearning.md`` section 5).

Everything is precomputed and local: training latents (2N rows, N unflipped then N flipped), training text
embeddings (N, captions, tokens, dim; memory-mapped, 186 GB at full size), query latents and embeddings, the
UNet state dict of the source model, optionally its diagonal Fisher and, for benchmarks with planted sources,
the ground-truth training images of each query. The CLIP-text baseline needs captions, which the release's
embeddings do not hold: the queries' prompts (``sample_caption.txt``) and the training captions of COCO's
``annotations/captions_train2017.json`` (the original's download puts it in the same folder). ``root: null``
generates the synthetic twin in this same format and reads it with this same loader.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from genattr.data.base import require_root
from genattr.utils.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: File names of the AbU MSCOCO release (``data.files`` can rename them); ``a|b``: the first that exists.
DEFAULT_FILES: dict[str, str] = {
    "train_latents": "coco17_train_latents.npy",
    "train_text_embeddings": "coco17_train_text_embeddings.npy",
    "query_latents": "coco17_sample_latents.npy",
    "query_text_embeddings": "coco17_sample_text_embeddings.npy",
    "unet": "model.safetensors|model.bin",
    "fisher": "fisher_info.safetensors|fisher_info.pt",
    "ground_truth": "query_ground_truth.json",
    "query_captions": "sample_caption.txt",
    "null_text_embedding": "null_text_embedding.npy",
    # COCO's caption annotations (row i = i-th image of the file, as pycocotools lists them), or one line per image
    "train_captions": "annotations/captions_train2017.json|train_captions.txt",
}
OPTIONAL = ("fisher", "ground_truth", "query_captions", "null_text_embedding", "train_captions")


@dataclass
class AttributionProtocol:
    """A trained text-to-image model, its training set and the generated queries to attribute."""

    kind: ClassVar[str] = "attribution"
    name: str
    source: str  # "twin" or "real"
    root: Path
    train_latents: np.ndarray  # (2N, C, H, W): rows [0, N) unflipped, [N, 2N) flipped
    train_text: np.ndarray  # (N, captions, tokens, dim); row i serves latents i and N + i
    query_latents: np.ndarray  # (S, C, H, W)
    query_text: np.ndarray  # (S, 1, tokens, dim)
    unet_weights: Path
    fisher: Path | None = None
    #: query index -> indices in [0, N) of its true source images (planted benchmarks only)
    ground_truth: dict[int, list[int]] | None = None
    query_captions: list[str] | None = None
    #: the training captions file (read on demand by :func:`read_train_captions`: COCO's is 90 MB)
    train_captions: Path | None = None
    #: (tokens, dim) embedding of the empty prompt, the unconditional input of classifier-free guidance
    null_text: np.ndarray | None = None
    #: a diffusers AutoencoderKL folder decoding the latents into images (``data.vae``); None on the twin
    vae: Path | None = None
    #: the latents are images in [-1, 1] (the twin), so nothing needs decoding
    pixel_space: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def n_train(self) -> int:
        return int(self.train_text.shape[0])

    @property
    def n_queries(self) -> int:
        return int(self.query_latents.shape[0])


def _load_npy(path: Path, what: str, ndim: int, mmap: bool) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path} does not exist; expected {what} there (a .npy file)")
    try:
        arr = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"{path} is not a readable .npy array ({type(err).__name__}: {err}); expected {what}") from err
    if arr.ndim != ndim or not np.issubdtype(arr.dtype, np.floating):
        raise DataError(f"{path} holds a {arr.dtype} array of shape {arr.shape}; expected {what}")
    _check_finite(arr, path, what)
    return arr


#: arrays up to this size are checked for NaN / inf in full when loaded (about 0.1 s); larger ones, memory-mapped
#: (the training text embeddings are 186 GB), on ``_SAMPLED_ROWS`` evenly spaced rows, so the check stays cheap
_FULL_CHECK_BYTES = 256 * 2**20
_SAMPLED_ROWS = 64


def _check_finite(arr: np.ndarray, path: Path, what: str) -> None:
    """A NaN or infinite value is an error naming the file and row: no row can be skipped without misaligning
    latents, embeddings, captions and ground truth, so arrays have no ``on_bad_image=skip``."""
    if arr.size == 0:
        return
    if arr.nbytes <= _FULL_CHECK_BYTES:
        rows = np.arange(len(arr))
    else:
        rows = np.unique(np.linspace(0, len(arr) - 1, _SAMPLED_ROWS).astype(np.int64))
    step = max(1, (_FULL_CHECK_BYTES // 8) // max(1, arr[0].nbytes))
    for start in range(0, len(rows), step):
        block = rows[start : start + step]
        finite = np.isfinite(np.asarray(arr[block])).reshape(len(block), -1).all(axis=1)
        if not finite.all():
            row = int(block[np.flatnonzero(~finite)[0]])
            raise DataError(f"{path} holds NaN or infinite values (first in row {row}); expected {what}, all finite")


def _load_ground_truth(path: Path, n_queries: int, n_train: int) -> dict[int, list[int]]:
    try:
        raw = json.loads(path.read_text())
        gt = {int(k): [int(i) for i in v] for k, v in raw.items()}
    except (ValueError, TypeError, AttributeError) as err:
        raise DataError(
            f"{path} is not a JSON object mapping query index to a list of training indices ({err})"
        ) from err
    for q, idx in gt.items():
        if not 0 <= q < n_queries or any(not 0 <= i < n_train for i in idx):
            raise DataError(f"{path}: query {q} -> {idx} is out of range ({n_queries} queries, {n_train} images)")
    return gt


def read_train_captions(path: Path, n_train: int) -> list[str]:
    """One caption per training image, row i first: a COCO caption-annotation JSON, or a text file.

    COCO JSON: image i is the i-th entry of ``images`` (the order of ``list(COCO(ann).imgs.keys())`` that the
    release's rows follow) and its caption the first annotation of that image in file order
    (``coco.imgToAnns[id][0]``, FastGDA ``extract_coco.py``), "" for an image without one. Text file: line i.
    """
    try:
        if path.suffix == ".json":
            raw = json.loads(path.read_text())
            first: dict[Any, str] = {}
            for ann in raw["annotations"]:
                first.setdefault(ann["image_id"], str(ann["caption"]))
            captions = [first.get(img["id"], "") for img in raw["images"]]
        else:
            captions = path.read_text().splitlines()
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(
            f"{path} is not a COCO caption-annotation JSON (images, annotations with image_id and caption) or a text "
            f"file of one caption per line ({type(err).__name__}: {err})"
        ) from err
    if len(captions) != n_train:
        raise DataError(f"{path} has captions for {len(captions)} images; the training set has {n_train}")
    return captions


def _first_existing(root: Path, spec: str) -> Path:
    options = [root / s for s in spec.split("|")]
    return next((p for p in options if p.is_file()), options[-1])


def _load_null_text(path: Path, tokens: int, dim: int) -> np.ndarray | None:
    if not path.is_file():
        return None
    arr = _load_npy(path, f"the empty prompt's text embedding of shape (1, {tokens}, {dim})", 3, mmap=False)
    if arr.shape != (1, tokens, dim):
        raise DataError(f"{path} holds shape {arr.shape}; expected the empty prompt's embedding (1, {tokens}, {dim})")
    return np.asarray(arr[0], dtype=np.float32)


def load_mscoco(
    root: str | Path, files: Mapping[str, str] | None = None, *, name: str = "mscoco", vae: str | None = None
) -> AttributionProtocol:
    """Read (and shape-check) an AbU-format folder; big arrays stay memory-mapped."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"data.root={root} does not exist; point it at the folder holding {DEFAULT_FILES['train_latents']} "
            "etc., or set data.root=null for the synthetic twin"
        )
    unknown = sorted(set(files or {}) - set(DEFAULT_FILES))
    if unknown:
        raise ConfigError(f"data.files has unknown keys {unknown}; valid: {sorted(DEFAULT_FILES)}")
    names = {**DEFAULT_FILES, **{k: v for k, v in (files or {}).items() if v}}
    paths = {k: _first_existing(root, v) for k, v in names.items()}
    lat = _load_npy(paths["train_latents"], "training latents of shape (2N, C, H, W)", 4, mmap=True)
    txt = _load_npy(
        paths["train_text_embeddings"], "training text embeddings of shape (N, captions, tokens, dim)", 4, mmap=True
    )
    qlat = _load_npy(paths["query_latents"], "query latents of shape (S, C, H, W)", 4, mmap=False)
    qtxt = _load_npy(
        paths["query_text_embeddings"], "query text embeddings of shape (S, 1, tokens, dim)", 4, mmap=False
    )
    n = txt.shape[0]
    if lat.shape[0] != 2 * n:
        raise DataError(
            f"{paths['train_latents']} has {lat.shape[0]} rows but {paths['train_text_embeddings']} has {n}; "
            "the latents must hold 2N rows (N unflipped, then N flipped)"
        )
    if qlat.shape[1:] != lat.shape[1:]:
        raise DataError(f"{paths['query_latents']} latents are {qlat.shape[1:]}, the training latents {lat.shape[1:]}")
    if qtxt.shape[0] != qlat.shape[0] or qtxt.shape[2:] != txt.shape[2:]:
        raise DataError(
            f"{paths['query_text_embeddings']} has shape {qtxt.shape}; expected ({qlat.shape[0]}, 1, "
            f"{txt.shape[2]}, {txt.shape[3]}) to match the queries and the training embeddings"
        )
    if not paths["unet"].is_file():
        raise DataError(f"{paths['unet']} does not exist; expected the UNet state dict of the source model")
    fisher = paths["fisher"] if paths["fisher"].is_file() else None
    gt = _load_ground_truth(paths["ground_truth"], qlat.shape[0], n) if paths["ground_truth"].is_file() else None
    null_text = _load_null_text(paths["null_text_embedding"], txt.shape[2], txt.shape[3])
    vae_path = None
    if vae is not None:
        vae_path = Path(vae).expanduser()
        if not (vae_path / "config.json").is_file():
            raise DataError(
                f"data.vae={vae} is not a diffusers AutoencoderKL folder (config.json + weights), e.g. the vae/ "
                "folder of stabilityai/stable-diffusion-2"
            )
    captions = None
    if paths["query_captions"].is_file():
        captions = paths["query_captions"].read_text().splitlines()[: qlat.shape[0]]
    info = {
        "n_train": int(n),
        "n_queries": int(qlat.shape[0]),
        "latent_shape": list(lat.shape[1:]),
        "captions_per_image": int(txt.shape[1]),
        "text_shape": list(txt.shape[2:]),
        "fisher_file": str(fisher) if fisher else None,
        "ground_truth_queries": len(gt) if gt else 0,
        "null_text_embedding": null_text is not None,
        "train_captions": str(paths["train_captions"]) if paths["train_captions"].is_file() else None,
        "vae": str(vae_path) if vae_path else None,
    }
    log.info("MSCOCO attribution data from %s: %s", root, info)
    return AttributionProtocol(
        name=name,
        source="real",
        root=root,
        train_latents=lat,
        train_text=txt,
        query_latents=np.asarray(qlat, dtype=np.float32),
        query_text=np.asarray(qtxt, dtype=np.float32),
        unet_weights=paths["unet"],
        fisher=fisher,
        ground_truth=gt,
        query_captions=captions,
        train_captions=paths["train_captions"] if paths["train_captions"].is_file() else None,
        null_text=null_text,
        vae=vae_path,
        info=info,
    )


def build_mscoco(
    *, name: str, root: str | None, files: Mapping[str, str] | None = None, vae: str | None = None
) -> AttributionProtocol:
    """``conf/data/mscoco.yaml`` ``_target_``: the release folder (a twin's folder is read the same way)."""
    return load_mscoco(require_root(root, "MSCOCO"), files, name=name, vae=vae)
