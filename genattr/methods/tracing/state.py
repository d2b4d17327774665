"""What the model tracer has computed so far, and how a stage checkpoint holds it.

Three parts, each in a format that loads without pickle: ``arrays`` (signals, features, scores, candidate
classes, decisions; ``arrays.npz``), ``tensors`` (fine-tuned inverse decoders, the class classifier, the score
functions, keyed ``<what>.<name>.<param>``; ``weights.safetensors``) and ``meta`` (calibrators, thresholds,
loss curves, timings; ``meta.json``). Every process holds the same state; the main process writes it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from genattr.data.rarvar import TracingProtocol
from genattr.utils.instantiate import build


@dataclass
class TracerState:
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def fresh(cls, protocol: TracingProtocol) -> TracerState:
        """An empty state that knows the generators' class count and null class (the candidate classes need it)."""
        gen_spec = protocol.models["var"].generators["var16"]
        with torch.device("meta"):  # only the class count is read: no weights allocated for a 2B model
            g = build(OmegaConf.create(gen_spec))
        return cls(meta={"timings": {}, "num_classes": int(g.num_classes), "null_class": int(g.null_class)})

    def write(self, folder: Path) -> None:
        np.savez(folder / "arrays.npz", **self.arrays)
        if self.tensors:
            save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(folder / "weights.safetensors"))
        (folder / "meta.json").write_text(json.dumps(self.meta, indent=1, default=float))

    @classmethod
    def load(cls, folder: Path) -> TracerState:
        with np.load(folder / "arrays.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        wfile = folder / "weights.safetensors"
        tensors = load_file(str(wfile)) if wfile.is_file() else {}
        return cls(arrays, tensors, json.loads((folder / "meta.json").read_text()))

    def put_weights(self, prefix: str, weights: Mapping[str, torch.Tensor]) -> None:
        """Keep a module's weights under ``<prefix>.<param>``."""
        self.tensors.update({f"{prefix}.{k}": v.detach().cpu() for k, v in weights.items()})

    def weights(self, prefix: str) -> dict[str, torch.Tensor]:
        """The weights kept under ``<prefix>.`` (empty when none were)."""
        pre = f"{prefix}."
        return {k[len(pre) :]: v for k, v in self.tensors.items() if k.startswith(pre)}
