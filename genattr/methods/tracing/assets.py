"""The task's images, hidden metadata columns and models, loaded when a stage asks for them.

A split's images are decoded once and kept (every stage reads them); a family's tokenizer is rebuilt from its
checkpoint on each request (the inverse-decoder fine-tuning changes one in place); its four generators are
loaded for one block and freed after, since the released ones are GBs each.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from genattr.data.rarvar import VARIANTS, ImageSplit, TracingProtocol
from genattr.methods.tracing.inverse import load_encoder_state
from genattr.methods.tracing.state import TracerState
from genattr.models.tokenizers.checkpoint import load_generator_checkpoint, load_tokenizer_checkpoint
from genattr.utils.instantiate import build


class TaskAssets:
    def __init__(self, protocol: TracingProtocol, device: torch.device) -> None:
        self.protocol = protocol
        self.device = device
        self._images: dict[str, torch.Tensor] = {}

    def images(self, split: ImageSplit | str) -> torch.Tensor:
        """uint8 [N, 3, H, W] of a split, decoded on first use."""
        sp = self.protocol.split(split) if isinstance(split, str) else split
        if sp.name not in self._images:
            self._images[sp.name] = sp.load()
        return self._images[sp.name]

    def hidden(self, split: str, key: str) -> list[str] | None:
        """A column of the twin's hidden metadata per image of ``split`` (None on the real task)."""
        protocol = self.protocol
        if not protocol.hidden or split not in protocol.hidden:
            return None
        rows = protocol.hidden[split]
        return [rows.get(n, {}).get(key, "") for n in protocol.split(split).names]

    def oracle_classes(self, split: str) -> np.ndarray | None:
        """The true class per image from the hidden metadata, −1 where none (outliers); None on the real task."""
        col = self.hidden(split, "class_id")
        return None if col is None else np.asarray([int(c) if c not in ("", None) else -1 for c in col])

    def tokenizer(self, family: str) -> Any:
        """The family's released tokenizer, frozen, on the device."""
        spec = self.protocol.models[family]
        tok = build(OmegaConf.create(spec.tokenizer))
        load_tokenizer_checkpoint(tok, spec.tokenizer_checkpoint)
        tok.to(self.device).eval().requires_grad_(False)
        return tok

    def finetuned_tokenizer(self, family: str, state: TracerState) -> Any:
        """The tokenizer with the inverse decoder of the ``models`` stage (the released one when none was tuned)."""
        tok = self.tokenizer(family)
        own = state.weights(f"inverse.{family}")
        if own:
            load_encoder_state(tok, own)
            tok.to(self.device)
        return tok

    @contextmanager
    def generators(self, family: str) -> Iterator[dict[str, Any]]:
        """The family's four generators, loaded for the block and freed after (real ones are GBs each)."""
        spec = self.protocol.models[family]
        tok = self.tokenizer(family)  # VAR generators read the codebook / φ for teacher forcing
        gens = {}
        for v in VARIANTS[family]:
            g = build(OmegaConf.create(spec.generators[v]))
            load_generator_checkpoint(g, spec.generator_checkpoints[v])
            if hasattr(g, "attach_tokenizer"):
                g.attach_tokenizer(tok)
            gens[v] = g.to(self.device).eval().requires_grad_(False)
        try:
            yield gens
        finally:
            del gens
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
