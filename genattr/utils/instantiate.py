"""The one place where config nodes become objects.

Every ``_target_`` in ``conf/`` is built through :func:`build`, so the switch to
Hydra 1.4's target whitelist (or any other policy) is a change in one line.
"""

from __future__ import annotations

import logging
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

#: Keys a group option may carry for genattr itself; they are never constructor kwargs.
META_KEYS = ("protocol", "twin_profile", "use_twin_profile", "supports", "not_result_shaping")


def build(node: DictConfig, *, recursive: bool = False, **runtime: Any) -> Any:
    """Instantiate ``node`` (which must have ``_target_``), dropping genattr meta keys.

    ``recursive`` is off by default so that nested nodes (e.g. a ``peft.LoraConfig``)
    reach the constructor as plain configs and are built where their runtime
    arguments are known.
    """
    if "_target_" not in node:
        raise TypeError(f"config node has no _target_: {OmegaConf.to_yaml(node)}")
    resolved = OmegaConf.to_container(node, resolve=True)
    clean = OmegaConf.create({k: v for k, v in resolved.items() if k not in META_KEYS})
    log.debug("building %s", clean._target_)
    return instantiate(clean, _recursive_=recursive, _convert_="all", **runtime)
