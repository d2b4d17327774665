"""Config helpers shared by ``launch.py``, ``genattr.run`` and the tests.

Resolvers are registered explicitly (never at import time) and the *twin profile*
lives here: when ``data.root`` is null the run uses the dataset's synthetic twin,
and the data option's ``twin_profile`` scales model / trainer / method down to
CPU size. Keys the user set on the command line always win over the profile.
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


def apply_twin_profile(cfg: DictConfig, explicit: set[str]) -> list[str]:
    """Scale the run down to the twin when ``data.root`` is null; return what changed.

    The profile is a nested mapping in the data option (``data.twin_profile``) whose
    leaves are config keys (``trainer.epochs``) to set. Leaves whose key (or a parent,
    or the config group) was overridden on the command line are left alone, so
    ``python launch.py trainer.epochs=5`` means 5 epochs on the twin too.
    """
    if cfg.data.root is not None or not cfg.data.use_twin_profile:
        return []
    profile = cfg.data.get("twin_profile")
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
            if old != value:
                OmegaConf.update(cfg, key, value, merge=False, force_add=True)
                changes.append(f"{key}: {old} -> {value}")
    if changes:
        log.warning(
            "data.root is null -> synthetic %s twin at CPU scale; twin profile applied "
            "(data.use_twin_profile=false keeps the paper-scale settings):\n  %s",
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
