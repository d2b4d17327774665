"""CLIP image towers built by open_clip, for detectors whose original builds them with open_clip.

AI-GenBench's ViT-L/14 CLIP baseline (``clipL14commonpool``) is open_clip's ``ViT-L-14`` with the
``laion/CLIP-ViT-L-14-CommonPool.XL-s13B-b90K`` weights. Building it with open_clip itself keeps the
original's module, parameter set and release file: no key conversion to trust, no extra parameter
(timm's converted CLIP head carries a zero bias the original does not have, which tune mode would
train), and every open_clip (model, tag) pair of the benchmark's table is reachable the same way.

A name is ``open_clip:<open_clip model>.<pretrained tag>``, e.g.
``open_clip:ViT-L-14.commonpool_xl_s13b_b90k`` (list them with
``python -c "import open_clip; print(open_clip.list_pretrained())"``). ``model.weights`` takes the
release file as published on the hub (``open_clip_pytorch_model.bin`` or
``open_clip_model.safetensors``), read without unrestricted pickle.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from genattr.models.backbones import hub_file_cached, hub_offline
from genattr.utils.errors import ConfigError

log = logging.getLogger(__name__)

PREFIX = "open_clip:"
#: open_clip's release files on the hub (open_clip/constants.py): pickle and safetensors versions
BIN_FILE = "open_clip_pytorch_model.bin"
SAFE_FILE = "open_clip_model.safetensors"
#: keys that OpenAI's CLIP checkpoints carry next to the weights (clip/model.py build_model drops them)
OPENAI_KEYS = ("input_resolution", "context_length", "vocab_size")


def is_open_clip_name(name: str) -> bool:
    return name.startswith(PREFIX)


def _open_clip() -> ModuleType:
    try:
        import open_clip
    except ImportError as e:  # pragma: no cover - open_clip_torch is a dependency
        raise ConfigError(f"open_clip names need the open_clip_torch package (pip install open_clip_torch): {e}") from e
    return open_clip


def parse_name(name: str) -> tuple[str, str | None]:
    """``"open_clip:ViT-L-14.commonpool_xl_s13b_b90k"`` -> ``("ViT-L-14", "commonpool_xl_s13b_b90k")``.

    The architecture must be an open_clip model config and the tag, when given, one of its
    pretrained tags; both are checked here, without network access.
    """
    open_clip = _open_clip()
    arch, _, tag = name.removeprefix(PREFIX).partition(".")
    if open_clip.get_model_config(arch) is None:
        close = [m for m in open_clip.list_models() if arch.split("-")[0].lower() in m.lower()][:12]
        raise ConfigError(
            f"model.name={name!r}: {arch!r} is not an open_clip model (close names: {close or 'none'}); list them "
            'with: python -c "import open_clip; print(open_clip.list_pretrained())"'
        )
    if tag and not open_clip.get_pretrained_cfg(arch, tag):
        raise ConfigError(
            f"model.name={name!r}: {tag!r} is not an open_clip pretrained tag of {arch} "
            f"(its tags: {open_clip.list_pretrained_tags_by_model(arch)})"
        )
    return arch, tag or None


def create_tower(
    *,
    name: str,
    pretrained: bool = False,
    weights: str | None = None,
    input_size: int | None = None,
    embedding: bool = True,
    kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """The image tower (``clip.visual``) of the open_clip model ``name``; the text tower is dropped.

    ``weights`` (a local release file) wins over ``pretrained`` (download by tag, as the original).
    ``embedding=True`` keeps the projection to the CLIP embedding (what ``encode_image`` returns);
    ``False`` removes it and returns the pooled, post-LayerNorm token (the original's
    ``next_to_last``). ``input_size`` other than the model's own resamples the position
    embeddings as open_clip does. ``kwargs`` go to ``open_clip.create_model``. The tower gets a
    ``num_features`` attribute, the width of what it returns.
    """
    open_clip = _open_clip()
    arch, tag = parse_name(name)
    extra: dict[str, Any] = {"pretrained_text": False, **dict(kwargs or {})}
    native = open_clip.get_model_config(arch)["vision_cfg"].get("image_size")
    if input_size is not None and input_size != native:
        extra.setdefault("force_image_size", int(input_size))
    device = torch.get_default_device()  # the meta device in shape-only checks
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ConfigError(f"model.weights={weights} does not exist (expected {BIN_FILE} or {SAFE_FILE}).")
        source = f"model.weights={path}"
        state = visual_state(read_state_dict(path), source=source, arch=arch)  # layout checked before building
        clip = open_clip.create_model(arch, pretrained=None, device=device, **extra)
        load_into_tower(clip, state, source=source, arch=arch)
        log.info("loaded open_clip %s image tower from %s", arch, path)
    elif pretrained:
        if tag is None:
            raise ConfigError(
                f"model.pretrained=true needs a pretrained tag in model.name={name!r} "
                f"(open_clip:{arch}.<tag>, tags: {open_clip.list_pretrained_tags_by_model(arch)}) or model.weights"
            )
        _check_reachable(open_clip, arch, tag)
        clip = open_clip.create_model(arch, pretrained=tag, device=device, require_pretrained=True, **extra)
    else:
        clip = open_clip.create_model(arch, pretrained=None, device=device, **extra)
    tower = clip.visual
    if embedding:
        dim = int(tower.output_dim)
    else:
        proj = getattr(tower, "proj", None)
        if not isinstance(proj, torch.Tensor):
            raise ConfigError(
                f"model.features=pooled needs an open_clip ViT with a projection to remove; {arch} has none "
                "(use model.features=embedding)"
            )
        dim = int(proj.shape[0])
        tower.proj = None
    tower.num_features = dim
    return tower


def _check_reachable(open_clip: ModuleType, arch: str, tag: str) -> None:
    """Offline + pretrained without a cached release file is an immediate error, not a hang."""
    if not hub_offline():
        return
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    repo, filename = os.path.split(cfg.get("hf_hub", ""))
    if repo:
        filename = filename or BIN_FILE
        # open_clip looks for the safetensors twin of the file first (pretrained.py _get_safe_alternatives)
        safe = SAFE_FILE if filename == BIN_FILE else filename.rsplit(".", 1)[0] + ".safetensors"
        names = (safe, filename)
        if hub_file_cached(repo, names):
            return
        where = f"the Hugging Face hub ({repo})"
    else:
        url = cfg.get("url", "")
        if url and (Path("~/.cache/clip").expanduser() / os.path.basename(url)).is_file():
            return
        where = url or "its download address"
    raise ConfigError(
        f"model.pretrained=true needs the open_clip {arch} '{tag}' weights from {where}, but HF_HUB_OFFLINE=1 "
        f"and they are not cached; set model.weights=/path/to/{BIN_FILE} (or {SAFE_FILE}) or model.pretrained=false."
    )


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives (OpenAI's CLIP releases) hold ``code/`` and ``constants.pkl``; state dicts do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist())


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` or weights-only ``torch.save`` file (open_clip's layouts).

    Training checkpoints (``{"state_dict": ...}``) and DDP ``module.`` prefixes are unwrapped, as
    open_clip's own loader does.
    """
    src = f"model.weights={path}"
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path))
        except Exception as e:
            raise ConfigError(f"{src} is not a readable safetensors file ({type(e).__name__})") from e
    else:
        if _is_torchscript(path):
            raise ConfigError(
                f"{src} is a TorchScript archive (the format of OpenAI's CLIP release), not an open_clip state dict; "
                f"use the model's open_clip release file ({BIN_FILE} or {SAFE_FILE})"
            )
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            # the cause (often several lines) is chained, so it reaches the job log
            raise ConfigError(f"{src} cannot be read as a weights-only PyTorch state dict ({type(e).__name__})") from e
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise ConfigError(f"{src} holds a {type(obj).__name__}, not a state dict of tensors")
    state = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def visual_state(state: Mapping[str, Any], *, source: str, arch: str) -> dict[str, torch.Tensor]:
    """The ``visual.*`` entries of a full open_clip state dict (prefix kept).

    A checkpoint of another layout (OpenAI's, timm's, not a CLIP at all) is a
    :class:`ConfigError` that says what the file looks like.
    """
    openai = [k for k in OPENAI_KEYS if k in state]
    if openai:
        raise ConfigError(
            f"{source} is an OpenAI CLIP checkpoint (it has {openai}), not the open_clip state dict of {arch}; "
            f"use the model's open_clip release file ({BIN_FILE} or {SAFE_FILE})"
        )
    visual = {k: v for k, v in state.items() if k.startswith("visual.")}
    if not visual:
        timm_like = "patch_embed.proj.weight" in state or any(k.startswith("blocks.") for k in state)
        what = "a timm checkpoint (patch_embed.* / blocks.* keys)" if timm_like else "not an open_clip CLIP state dict"
        raise ConfigError(
            f"{source} has no visual.* keys: it is {what}; give the open_clip release file ({BIN_FILE} or "
            f"{SAFE_FILE}) or, for timm weights, a timm model name"
        )
    odd = [k for k, v in visual.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise ConfigError(f"{source} has non-tensor entries where weights belong (e.g. {odd[:3]})")
    return visual


def load_into_tower(clip: nn.Module, visual: Mapping[str, torch.Tensor], *, source: str, arch: str) -> None:
    """Load ``visual.*`` weights (from :func:`visual_state`) into ``clip.visual``, strictly.

    Missing, unexpected or wrongly shaped keys (another architecture) are one
    :class:`ConfigError` naming a few of each, before anything is loaded.
    """
    from open_clip.model import resize_pos_embed

    full = dict(visual)
    try:
        resize_pos_embed(full, clip)  # in place, only when the input size differs (as open_clip's loader)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"{source}: its position embeddings do not fit open_clip {arch} ({e})") from e
    got = {k.removeprefix("visual."): v for k, v in full.items()}
    expected = {k: tuple(v.shape) for k, v in clip.visual.state_dict().items()}
    missing = sorted(expected.keys() - got.keys())
    unexpected = sorted(got.keys() - expected.keys())
    wrong = [
        f"{k} {tuple(got[k].shape)} (expected {expected[k]})"
        for k in sorted(expected.keys() & got.keys())
        if tuple(got[k].shape) != expected[k]
    ]
    problems = [
        f"{len(items)} {label} (e.g. {', '.join(items[:3])})"
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong))
        if items
    ]
    if problems:
        raise ConfigError(f"{source} does not fit open_clip {arch}'s image tower: {'; '.join(problems)}")
    clip.visual.load_state_dict(got, strict=True)
