"""The one place where config nodes become objects.

Every ``_target_`` in ``conf/`` is built through :func:`build`, so the switch to
Hydra 1.4's target whitelist (or any other policy) is a change in one line.
"""

from __future__ import annotations

import logging
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from genattr.utils.typecheck import check_argument_types

log = logging.getLogger(__name__)

#: Keys a group option may carry for genattr itself; they are never constructor kwargs.
#: ``twin`` and ``cpu_profile`` (data) and ``twin_pretrain`` (model) are read by the run and the twins, never built.
META_KEYS = (
    "protocol",
    "twin",
    "cpu_profile",
    "cpu_profile_on_real_data",
    "twin_pretrain",
    "supports",
    "not_result_shaping",
)


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
    args = {k: v for k, v in resolved.items() if k not in META_KEYS and not str(k).startswith("_")}
    check_argument_types(str(clean._target_), args, node._get_full_key(None) if isinstance(node, DictConfig) else "")
    log.debug("building %s", clean._target_)
    return instantiate(clean, _recursive_=recursive, _convert_="all", **runtime)
