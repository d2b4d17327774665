"""Config helpers shared by ``launch.py``, ``genattr.run`` and the tests.

Resolvers are registered explicitly (never at import time) and the *CPU profile* lives
here: ``profile=cpu`` applies the data option's ``cpu_profile`` (model / trainer / method
scaled down to a CPU), ``profile=paper`` keeps the paper's settings, and ``profile=auto``
(the default) means ``cpu`` on a twin (``data.root: null``) and ``paper`` on real data.
Keys the user set on the command line always win over the profile.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from genattr.utils.errors import ConfigError

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = PROJECT_ROOT / "conf"


def register_resolvers() -> None:
    """Register genattr's OmegaConf resolvers (idempotent)."""
    if not OmegaConf.has_resolver("genattr_root"):
        OmegaConf.register_new_resolver("genattr_root", lambda: str(PROJECT_ROOT))


def explicit_override_keys(overrides: Iterable[str]) -> set[str]:
    """Dotted keys set by command-line overrides (``a.b=1``, ``+a.b=1``, ``~a``, ``group=x``)."""
    keys = set()
    for ov in overrides:
        key = ov.split("=", 1)[0].lstrip("+~")
        keys.add(key)
    return keys


def _covered(key: str, explicit: set[str]) -> bool:
    parts = key.split(".")
    return any(".".join(parts[:i]) in explicit for i in range(1, len(parts) + 1))


def _leaves(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Dotted keys and values of a nested mapping; an empty mapping is a value (``kwargs: {}`` clears)."""
    if isinstance(node, dict) and (node or not prefix):
        out: list[tuple[str, Any]] = []
        for k, v in node.items():
            out += _leaves(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return [(prefix, node)]


PROFILES = ("auto", "cpu", "paper")
_UNSET = object()


def profile_in_use(cfg: DictConfig) -> str:
    """``cpu`` or ``paper``: what ``profile`` (``auto`` | ``cpu`` | ``paper``) means for this data."""
    mode = str(cfg.profile)
    if mode not in PROFILES:
        raise ConfigError(f"profile={mode} is not a profile; use one of {'|'.join(PROFILES)}")
    if mode == "auto":
        return "cpu" if cfg.data.root is None else "paper"
    return mode


def apply_cpu_profile(cfg: DictConfig, explicit: set[str]) -> list[str]:
    """Scale the run down to a CPU when :func:`profile_in_use` says ``cpu``; return what changed.

    The profile is a nested mapping in the data option (``data.cpu_profile``) whose
    leaves are config keys (``trainer.epochs``) to set. Leaves whose key (or a parent,
    or the config group) was overridden on the command line are left alone, so
    ``python launch.py trainer.epochs=5`` means 5 epochs on the twin too. A data option
    whose profile only fits its twin (``data.cpu_profile_on_real_data: false``) refuses
    ``profile=cpu`` on real data.
    """
    if profile_in_use(cfg) != "cpu":
        return []
    if cfg.data.root is not None and not cfg.data.cpu_profile_on_real_data:
        raise ConfigError(
            f"profile=cpu with data={cfg.data.name} on real data (data.root={cfg.data.root}): its cpu_profile shapes "
            "the twin's models and does not fit the real release; use profile=paper (or auto) with real data"
        )
    profile = cfg.data.cpu_profile
    if not profile:
        return []
    changes = []
    # value overrides (a.b=1) always win; of group choices only model=... does: picking a
    # backbone by hand means "this backbone", while method=replay still wants CPU scale
    values = {k for k in explicit if "." in k}
    with open_dict(cfg):
        for key, value in _leaves(OmegaConf.to_container(profile, resolve=False)):
            group = key.split(".")[0]
            if _covered(key, values) or (group == "model" and "model" in explicit):
                continue
            old = OmegaConf.select(cfg, key, default="<unset>")
            if group == "method" and OmegaConf.select(cfg, ".".join(key.split(".")[:2]), default=_UNSET) is _UNSET:
                continue  # an option of another method of the family (LoRAX's memory for an NCM run)
            if old != value:
                OmegaConf.update(cfg, key, value, merge=False, force_add=True)
                changes.append(f"{key}: {old} -> {value}")
    if changes:
        log.warning(
            "profile=cpu (%s): data.cpu_profile of %s applied (profile=paper keeps the paper-scale settings):\n  %s",
            "the twin" if cfg.data.root is None else "real data",
            cfg.data.name,
            "\n  ".join(changes),
        )
    return changes


def check_compatibility(cfg: DictConfig) -> None:
    """Fail fast, in one sentence, on a method x data combination that makes no sense."""
    supports = list(cfg.method.supports)
    protocol = cfg.data.get("protocol")
    if protocol not in supports:
        raise ConfigError(
            f"method={cfg.method.name} supports the protocols {supports}, but data={cfg.data.name} "
            f"is a '{protocol}' protocol; choose a method that supports '{protocol}' "
            f"(see conf/method/*.yaml 'supports')."
        )


def _added(override: str) -> str | None:
    """The dotted key of a ``+key=value`` / ``++key=value`` override, ``None`` for anything else or a group."""
    if not override.startswith("+") or "=" not in override:
        return None
    key = override.split("=", 1)[0].lstrip("+").split("@", 1)[0]
    if (CONF_DIR / key.replace(".", "/")).is_dir():  # +experiment=..., +local=...: a config group, not a key
        return None
    return key


def reject_unknown_additions(overrides: Sequence[str], compose: Callable[[list[str]], DictConfig]) -> None:
    """Refuse ``+key=value`` for a key genattr does not have (``+method.memory.sise=10`` used to run silently
    with the default memory): every option has its default in the YAML, so a real option is set without ``+``.

    ``compose(overrides)`` builds the config without the additions to look the keys up in. Free-form mappings
    (``data.files``, ``model.kwargs``: empty in the YAML) take new keys; so does anything that exists already.
    """
    adds = [(ov, key) for ov in overrides if (key := _added(ov)) is not None]
    if not adds:
        return
    base = compose([ov for ov in overrides if ov not in {a for a, _ in adds}])
    for ov, key in adds:
        parent_key, _, leaf = key.rpartition(".")
        if OmegaConf.select(base, key, default="<absent>") != "<absent>":
            continue
        parent = OmegaConf.select(base, parent_key, default=None) if parent_key else base
        if isinstance(parent, DictConfig) and len(parent) == 0:
            continue
        known = list(parent.keys()) if isinstance(parent, DictConfig) else []
        close = difflib.get_close_matches(leaf, [str(k) for k in known], n=1)
        hint = f" (did you mean {parent_key + '.' if parent_key else ''}{close[0]}?)" if close else ""
        where = f"{parent_key} has no key '{leaf}'" if isinstance(parent, DictConfig) else f"there is no {parent_key}"
        raise ConfigError(
            f"{ov}: {where}{hint}; every genattr option already has a default in conf/, so set an existing one "
            "without '+' (`make cfg` prints them all)."
        )
