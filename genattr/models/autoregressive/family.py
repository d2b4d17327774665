"""Build a family (tokenizer + its generator variants) from a models mapping and a folder of local checkpoints.

The mapping is the same for the twin (``<twin>/checkpoints/models.json``) and for the real models
(``conf/model/prada_real.yaml``)::

    {"tokenizer": {"_target_": ..., **kwargs}, "tokenizer_checkpoint": "<file>",
     "variants": {"<label>": {"generator": {"_target_": ..., **kwargs}, "checkpoint": "<file>"}, ...}}

so the pipeline loads twin and released weights through one code path.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from torch import nn

from genattr.models.tokenizers.checkpoint import load_generator_checkpoint, load_tokenizer_checkpoint
from genattr.utils.instantiate import build


def build_model(node: Mapping[str, Any], **runtime: Any) -> nn.Module:
    """Instantiate one ``_target_`` mapping (plain dict or DictConfig)."""
    return build(OmegaConf.create(dict(node)) if not OmegaConf.is_config(node) else node, **runtime)


def load_family(
    entry: Mapping[str, Any], checkpoint_dir: str | Path, *, variants: list[str] | None = None
) -> tuple[nn.Module, dict[str, nn.Module]]:
    """Tokenizer and generators of one family, weights loaded strictly, frozen and in eval mode."""
    root = Path(checkpoint_dir)
    tokenizer = build_model(entry["tokenizer"])
    load_tokenizer_checkpoint(tokenizer, root / entry["tokenizer_checkpoint"])
    tokenizer.eval().requires_grad_(False)
    gens: dict[str, nn.Module] = {}
    for label, spec in entry["variants"].items():
        if variants is not None and label not in variants:
            continue
        gen = build_model(spec["generator"])
        load_generator_checkpoint(gen, root / spec["checkpoint"])
        if hasattr(gen, "attach_tokenizer"):
            gen.attach_tokenizer(tokenizer)
        gens[label] = gen.eval().requires_grad_(False)
    return tokenizer, gens
