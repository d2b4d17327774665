"""Load tokenizer / generator weights from local files: safetensors (twin) or weights-only torch files (released).

The released VAR/RAR checkpoints are plain state dicts saved with ``torch.save`` (``.pth`` / ``.bin``); they
are read with ``weights_only=True`` so no pickle code runs. Twin checkpoints are safetensors with the same
key names, so the pipeline loads both the same way.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from genattr.utils.errors import ConfigError

log = logging.getLogger(__name__)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file; a missing file is a ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint file {path} does not exist; point the model's checkpoint entry at a local file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):  # tolerate the two usual wrappers
        if isinstance(obj, dict) and set(obj) == {key}:
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ConfigError(f"checkpoint file {path} does not hold a state dict (found {type(obj).__name__})")
    return obj


def _load(model: nn.Module, path: str | Path, what: str) -> nn.Module:
    state = read_state_dict(path)
    own = model.state_dict()
    # buffers that are pure functions of the config may be absent from a file (they are rebuilt on init)
    derived = set(getattr(model, "derived_state_keys", ()))
    missing = [k for k in own if k not in state and k not in derived]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)}≠{tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    # VAR's VQVAE replaces usage statistics of another scale count (they only matter for VAE training)
    for k in [w.split(" ")[0] for w in wrong if w.endswith("ema_vocab_hit_SV")]:
        state[k] = own[k]
    wrong = [w for w in wrong if not w.split(" ")[0].endswith("ema_vocab_hit_SV")]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:4])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:4])})")
        if wrong:
            parts.append(f"{len(wrong)} with another shape (e.g. {', '.join(wrong[:3])})")
        raise ConfigError(
            f"{what} checkpoint {path} does not match {type(model).__name__}: {'; '.join(parts)}; check the model"
        )
    for k in derived:
        state.setdefault(k, own[k])
    model.load_state_dict(state, strict=True)
    log.info("loaded %s weights from %s", what, path)
    return model


def load_tokenizer_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a tokenizer's weights strictly (upstream key names); ConfigError on a missing file or key mismatch."""
    return _load(model, path, "tokenizer")


def load_generator_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a generator's weights strictly (upstream key names); ConfigError on a missing file or key mismatch."""
    return _load(model, path, "generator")


def save_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Write a model's state dict as safetensors (contiguous CPU copies; shared tensors are cloned)."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
