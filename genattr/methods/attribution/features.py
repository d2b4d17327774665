"""Feature towers (CLIP image, DINO, CLIP text) for the feature baselines and the CLIP similarity of Delta G.

The AbU paper's feature baselines (App. B.3) rank training images by the cosine of their features with the
query's: CLIP ViT-B/32 image embeddings, DINO ViT-B/16 CLS features and CLIP ViT-B/32 text embeddings, both
flips scored and the max kept. The authors' extraction code (``PeterWang512/FastGDA``
``feature_extraction/extract_coco.py``, ``PeterWang512/GenDataAttribution`` ``models/{clip,dino}_model.py``)
uses OpenAI CLIP ``encode_image`` with its preprocessing (bicubic resize to 224, centre crop 224), the
torch-hub DINO ``dino_vitb16`` (bicubic resize to 256, centre crop 224, ImageNet statistics), and OpenAI
CLIP ``encode_text`` of ``clip.tokenize(caption, truncate=True)``: a training image's first COCO caption,
a query's prompt. Here the image towers are timm models by name (``vit_base_patch32_clip_quickgelu_224.openai``
keeps CLIP's QuickGELU and its 512-d projection head; ``vit_base_patch16_224.dino`` returns the CLS token),
the text tower is open_clip's ``ViT-B-32-quickgelu`` with the ``openai`` weights (the same network and
tokenizer as the ``clip`` package), preprocessing is in the config, and the weights come from a local file
(``weights``, for offline nodes), the hub (``pretrained: true``), or nowhere: a randomly initialised tower,
announced by a warning and recorded as ``random_init`` in the results and MLflow tags, so a number from it is
never mistaken for the paper's baseline.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F

from genattr.methods.attribution.losses import max_over_flips
from genattr.models.backbones import hub_file_cached, hub_offline
from genattr.models.open_clip_towers import BIN_FILE, PREFIX, SAFE_FILE
from genattr.utils.errors import ConfigError

log = logging.getLogger(__name__)

#: what a tower's weights are, for the results and the MLflow tags
SOURCES = ("file", "hub", "random_init")
#: the files timm reads from a hub repo, and those open_clip reads
TIMM_FILES = ("model.safetensors", "pytorch_model.bin")
OPEN_CLIP_FILES = (SAFE_FILE, BIN_FILE)


def _hub_repo(name: str) -> str | None:
    """The Hugging Face repo a timm name or an ``open_clip:<arch>.<tag>`` name downloads its weights from."""
    if name.startswith(PREFIX):
        import open_clip

        arch, _, tag = name.removeprefix(PREFIX).partition(".")
        cfg = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
        return (cfg or {}).get("hf_hub", "").rstrip("/") or None
    cfg = timm.models.get_pretrained_cfg(name)
    return getattr(cfg, "hf_hub_id", None) if cfg is not None else None


def weights_source(key: str, name: str, weights: str | None, pretrained: bool) -> str:
    """Where tower ``key``'s weights come from (one of :data:`SOURCES`), checked without loading them.

    A missing ``weights`` file, or ``pretrained`` with ``HF_HUB_OFFLINE=1`` and no cached copy, is a
    :class:`ConfigError`; the run's preflight calls this so the error comes before hours of Fisher.
    """
    where = f"method.features.{key}"
    if weights is not None:
        if not Path(weights).expanduser().is_file():
            raise ConfigError(f"{where}.weights={weights} does not exist (expected a .safetensors or .bin/.pth file)")
        return "file"
    if not pretrained:
        return "random_init"
    repo = _hub_repo(name)
    files = OPEN_CLIP_FILES if name.startswith(PREFIX) else TIMM_FILES
    if hub_offline() and not (repo and hub_file_cached(repo, files)):
        raise ConfigError(
            f"{where}.pretrained=true needs the {name} weights from the Hugging Face hub ({repo}), but "
            f"HF_HUB_OFFLINE=1 and they are not cached; set {where}.weights=/path/to/<{' or '.join(files)}>, or "
            f"drop {key} from method.baselines"
        )
    return "hub"


def _warn_random_init(key: str, name: str) -> None:
    log.warning(
        "method.features.%s: NO WEIGHTS (weights=null, pretrained=false): a RANDOMLY INITIALISED %s; its scores "
        "are not the paper's %s baseline (recorded as features.%s=random_init)",
        key,
        name,
        key,
        key,
    )


class FeatureTower:
    """One frozen image encoder with its preprocessing; ``embed`` maps images in [-1, 1] to unit features."""

    def __init__(
        self,
        key: str,
        *,
        name: str,
        weights: str | None = None,
        pretrained: bool = True,
        resize: int = 224,
        crop: int = 224,
        kwargs: Mapping[str, Any] | None = None,
        batch_size: int = 64,
        device: torch.device | str = "cpu",
    ) -> None:
        where = f"method.features.{key}"
        if not timm.is_model(name):
            raise ConfigError(f"{where}.name={name} is not a timm model")
        extra = dict(kwargs or {})
        self.source = weights_source(key, name, weights, pretrained)
        if self.source == "file":
            path = Path(str(weights)).expanduser()
            log.info("%s: %s weights from %s", where, name, path)
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **extra)
        else:
            if self.source == "random_init":
                _warn_random_init(key, name)
            model = timm.create_model(name, pretrained=self.source == "hub", **extra)
        self.key, self.name = key, name
        self.model = model.eval().to(device)
        self.device = device
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        self.mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406)), dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225)), dtype=torch.float32).view(1, 3, 1, 1)
        self.resize, self.crop, self.batch_size = int(resize), int(crop), int(batch_size)
        if self.crop > self.resize:
            raise ConfigError(f"{where}: crop={crop} is larger than resize={resize}")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images -> bicubic resize of the shorter side, centre crop, the tower's normalisation."""
        x = ((images.float() + 1) / 2).clamp(0, 1)
        h, w = x.shape[-2:]
        scale = self.resize / min(h, w)
        size = (max(self.resize, round(h * scale)), max(self.resize, round(w * scale)))
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (size[0] - self.crop) // 2, (size[1] - self.crop) // 2
        x = x[..., top : top + self.crop, left : left + self.crop]
        return (x - self.mean) / self.std

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm features (B, D), float64 on the CPU."""
        out = []
        for s in range(0, images.shape[0], self.batch_size):
            x = self.preprocess(images[s : s + self.batch_size]).to(self.device)
            out.append(self.model(x).double().cpu())
        return F.normalize(torch.cat(out), dim=1)


class TextTower:
    """A frozen open_clip text encoder (``open_clip:<arch>.<tag>``); ``embed`` maps captions to unit features.

    ``open_clip:ViT-B-32-quickgelu.openai`` is OpenAI CLIP ViT-B/32 (QuickGELU), the network of
    ``clip.load("ViT-B/32")``; open_clip's tokenizer is CLIP's byte-pair tokenizer with the same truncation
    (77 tokens, the last one forced to end-of-text), so ``embed`` returns what ``encode_text`` of
    ``clip.tokenize(captions, truncate=True)`` returns, in float32 instead of the original's CUDA float16.
    """

    def __init__(
        self,
        key: str,
        *,
        name: str,
        weights: str | None = None,
        pretrained: bool = True,
        kwargs: Mapping[str, Any] | None = None,
        batch_size: int = 256,
        device: torch.device | str = "cpu",
    ) -> None:
        import open_clip

        where = f"method.features.{key}"
        arch, _, tag = name.removeprefix(PREFIX).partition(".")
        if not name.startswith(PREFIX) or open_clip.get_model_config(arch) is None:
            raise ConfigError(f"{where}.name={name} is not an open_clip model (open_clip:<model>.<pretrained tag>)")
        if pretrained and weights is None and not open_clip.get_pretrained_cfg(arch, tag):
            raise ConfigError(f"{where}.name={name}: {tag!r} is not a pretrained tag of open_clip {arch}")
        extra = dict(kwargs or {})
        self.source = weights_source(key, name, weights, pretrained)
        if self.source == "hub":
            model = open_clip.create_model(arch, pretrained=tag, require_pretrained=True, **extra)
        else:
            model = open_clip.create_model(arch, pretrained=None, **extra)
        if self.source == "file":
            path = Path(str(weights)).expanduser()
            try:
                open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
            except Exception as err:  # noqa: BLE001 - any load failure is a bad file
                raise ConfigError(
                    f"{where}.weights={path} is not an open_clip state dict of {arch} (e.g. {BIN_FILE} or {SAFE_FILE} "
                    f"of the hub repo {_hub_repo(name)}): {type(err).__name__}: {err}"
                ) from err
            log.info("%s: %s weights from %s", where, name, path)
        elif self.source == "random_init":
            _warn_random_init(key, name)
        self.key, self.name = key, name
        self.model = model.eval().to(device)
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.device, self.batch_size = device, int(batch_size)

    @torch.no_grad()
    def embed(self, captions: Sequence[str]) -> torch.Tensor:
        """Unit-norm text embeddings (B, D), float64 on the CPU."""
        out = []
        for s in range(0, len(captions), self.batch_size):
            tokens = self.tokenizer([c.strip() for c in captions[s : s + self.batch_size]]).to(self.device)
            out.append(self.model.encode_text(tokens).double().cpu())
        return F.normalize(torch.cat(out), dim=1)


def build_towers(
    keys: list[str], cfg: Mapping[str, Mapping[str, Any]], device: torch.device | str = "cpu"
) -> dict[str, FeatureTower]:
    """The image towers of ``keys`` from ``method.features`` (a missing entry is a :class:`ConfigError`)."""
    out = {}
    for k in keys:
        if k not in cfg:
            raise ConfigError(f"method.features has no entry for {k} (name, weights, pretrained, resize, crop)")
        out[k] = FeatureTower(k, device=device, **dict(cfg[k]))
    return out


def pixel_embed(images: torch.Tensor) -> torch.Tensor:
    """Flattened pixels as unit vectors (B, C*H*W), float64: the pixel baseline's features."""
    return F.normalize(images.double().flatten(1), dim=1)


def image_similarities(
    embedders: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
    query_images: torch.Tensor,
    train_images: Callable[[int, int], torch.Tensor],
    rows: range,
    chunk: int = 1024,
) -> dict[str, np.ndarray]:
    """Per embedder, (Q, len(rows)) cosine of each query's features with those of the training ``rows``.

    ``embedders`` map images to unit features (a tower's ``embed``, :func:`pixel_embed`).
    ``train_images(start, stop)`` returns rows [start, stop) of the 2N as [-1, 1] images, so real data are
    decoded chunk by chunk, once for all embedders, and never held whole; a process of a sharded run passes its
    own contiguous rows.
    """
    queries = {k: f(query_images) for k, f in embedders.items()}
    sims: dict[str, list[torch.Tensor]] = {k: [] for k in embedders}
    for s in range(rows.start, rows.stop, chunk):
        images = train_images(s, min(s + chunk, rows.stop))
        for k, f in embedders.items():
            sims[k].append(queries[k] @ f(images).T)
    n_q = query_images.shape[0]
    return {k: torch.cat(v, dim=1).numpy() if v else np.zeros((n_q, 0)) for k, v in sims.items()}


def image_similarity_scores(
    embedders: Mapping[str, Callable[[torch.Tensor], torch.Tensor]],
    query_images: torch.Tensor,
    train_images: Callable[[int, int], torch.Tensor],
    n_rows: int,
    chunk: int = 1024,
) -> dict[str, np.ndarray]:
    """:func:`image_similarities` of all ``n_rows`` training rows, (Q, N) after the max over the two flips."""
    sims = image_similarities(embedders, query_images, train_images, range(n_rows), chunk)
    return {k: np.stack([max_over_flips(r) for r in v]) for k, v in sims.items()}


def text_similarity_scores(
    tower: TextTower, query_captions: Sequence[str], train_captions: Sequence[str]
) -> np.ndarray:
    """(Q, N) cosine of each query prompt's text embedding with each training image's caption.

    A caption is the same for both flips of an image, so the max over flips is the score itself.
    """
    return (tower.embed(query_captions) @ tower.embed(train_captions).T).numpy()


def image_decoder(
    pixel_space: bool, vae: str | Path | None, device: torch.device | str
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Latents -> images in [-1, 1]: the identity on the twin (its latents are pixels), the ``data.vae`` on real
    data, else None (nothing can decode them)."""
    from genattr.models.diffusion import decode_latents, load_vae

    if pixel_space:
        return lambda x: x.float().clamp(-1, 1)
    if vae is None:
        return None
    decoder = load_vae(vae, device)
    return lambda x: decode_latents(decoder, x)


def tag_towers(tracker: Any, main_process: bool, towers: Mapping[str, FeatureTower | TextTower]) -> dict[str, Any]:
    """What each tower is and where its weights came from, also as the MLflow tags ``features.<key>``."""
    info = {k: {"name": t.name, "weights": t.source} for k, t in towers.items()}
    set_tags = getattr(tracker, "set_tags", None)
    if info and set_tags is not None and main_process:
        set_tags({f"features.{k}": v["weights"] for k, v in info.items()})
    return info
