"""What a twin hands the run: a folder in the real format, plus the few keys its own files answer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Twin:
    """A synthetic stand-in for one data option, already on disk.

    ``root`` is what ``data.root`` would be for the real dataset, so the real loader reads it unchanged. ``data``
    holds data keys the twin's files decide instead of the config (its own timeline table, its checkpoints'
    manifest, its image size); ``model`` likewise for the model (a twin-pretrained backbone file as
    ``model.weights``); ``protocol`` sets attributes on the built protocol that no real release has (the twin's
    "latents" are pixels). ``info`` is logged as ``data/info.json["twin"]``.
    """

    root: Path
    info: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    protocol: dict[str, Any] = field(default_factory=dict)


def plain(params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` with sequences as lists and mappings as dicts, so a tracker logs them like any param."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            out[str(key)] = plain(value)
        elif isinstance(value, Sequence) and not isinstance(value, str):
            out[str(key)] = list(value)
        else:
            out[str(key)] = value
    return out
