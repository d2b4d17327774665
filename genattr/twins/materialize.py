"""From ``data.root: null`` to a twin on disk, before the run builds its protocol.

A data option names its twin in ``data.twin._target_``: a function ``(data=..., params=..., cache_dir=...)``
returning a :class:`~genattr.twins.spec.Twin`. The run calls :func:`materialize` and then builds the protocol with
the *real* loader on ``Twin.root`` (plus the keys the twin's own files answer), so a twin exercises exactly the
code a real dataset does and no real loader, model or metric needs to know that twins exist.

Twins are cached (see :mod:`genattr.twins.cache`); on several processes the main process builds first and the
others then find the cache. Building one never touches the run's random streams: a run on a cold cache and the
same run on a warm one draw the same numbers.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf, open_dict

from genattr.twins.spec import Twin
from genattr.utils.errors import ConfigError
from genattr.utils.io import cache_dir

log = logging.getLogger(__name__)


@contextmanager
def _untouched_rng() -> Any:
    """Run a block without moving the torch, numpy or Python random streams of the caller."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def twin_spec(data: DictConfig) -> tuple[Callable[..., Twin], dict[str, Any], Path]:
    """The twin's builder, its parameters (its cache key) and its cache folder, from ``data.twin``."""
    node = data.get("twin")
    if node is None or "_target_" not in node:
        raise ConfigError(f"data={data.name} has data.root=null but no data.twin._target_; set data.root to the data")
    params = OmegaConf.to_container(node, resolve=True)
    assert isinstance(params, dict)
    target = str(params.pop("_target_"))
    return get_method(target), params, cache_dir(params.pop("cache_dir", None))


def materialize(cfg: DictConfig, *, main_process: bool = True, wait: Callable[[], None] | None = None) -> Twin | None:
    """Build (or find in the cache) the twin of ``cfg.data`` when ``data.root`` is null; ``None`` otherwise."""
    if cfg.data.root is not None:
        return None
    builder, params, cache = twin_spec(cfg.data)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    assert isinstance(data, dict) and isinstance(model, dict)
    log.warning("data.root is null: using the SYNTHETIC %s twin (set data.root for real results)", cfg.data.name)
    twin = None
    if main_process:
        with _untouched_rng():
            twin = builder(data=data, model=model, params=params, cache_dir=cache)
    if wait is not None:
        wait()
    if twin is None:
        with _untouched_rng():
            twin = builder(data=data, model=model, params=params, cache_dir=cache)
    log.info("twin of %s at %s", cfg.data.name, twin.root)
    return twin


def build_kwargs(twin: Twin | None) -> dict[str, Any]:
    """Keyword arguments for the data builder: the twin's root and the data keys its files decide."""
    return {} if twin is None else {"root": str(twin.root), **twin.data}


def mark(protocol: Any, twin: Twin | None) -> Any:
    """Tag a protocol built from a twin's folder as the twin's (``source``, ``info["twin"]``, own attributes)."""
    if twin is None:
        return protocol
    protocol.source = "twin"
    protocol.info["twin"] = twin.info
    for key, value in twin.protocol.items():
        setattr(protocol, key, value)
    return protocol


def model_overrides(cfg: DictConfig, twin: Twin | None) -> None:
    """Set on ``cfg.model`` the model keys the twin decides (a twin-pretrained backbone's weights file)."""
    if twin is None:
        return
    with open_dict(cfg):
        for key, value in twin.model.items():
            OmegaConf.update(cfg.model, key, value, merge=False, force_add=True)
