"""Config values checked against the annotations of the function they are passed to.

``python launch.py data.crop=abc`` should not end in ``int('abc')`` deep inside a loader: the
``_target_`` of every built node declares its argument types, so a value of the wrong type is
one sentence naming the key before the target runs. Only plain scalar annotations (``int``,
``float``, ``str``, ``bool``, unions of them with ``None``) are checked; anything richer is left to
the target, which names its own keys.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Mapping
from typing import Any

from genattr.utils.errors import ConfigError

_SCALARS = (bool, int, float, str)


def _accepted(hint: Any) -> set[type] | None:
    """The scalar types ``hint`` accepts, or None when it is not a union of scalars (and None)."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    out: set[type] = set()
    for arg in typing.get_args(hint) if union else (hint,):
        if arg is type(None):
            continue
        if arg not in _SCALARS:
            return None
        out.add(arg)
    return out or None


def _fits(value: Any, accepted: set[type]) -> bool:
    if isinstance(value, bool):  # bool is an int to Python, never to a config
        return bool in accepted
    if isinstance(value, int):
        return int in accepted or float in accepted
    if isinstance(value, float):
        return float in accepted
    if isinstance(value, str):
        return str in accepted
    return False


def _hints(target: str) -> dict[str, Any]:
    try:
        from hydra.utils import get_object

        obj = get_object(target)
        return typing.get_type_hints(obj.__init__ if inspect.isclass(obj) else obj)
    except Exception:  # noqa: BLE001 - unresolvable annotations: the target reports its own errors
        return {}


def check_argument_types(target: str, kwargs: Mapping[str, Any], key: str) -> None:
    """Raise a ``ConfigError`` naming ``<key>.<name>`` for the first value whose type the target does not accept.

    ``None`` is never flagged here (whether a key may be null is the target's business).
    """
    hints = _hints(target)
    for name, value in kwargs.items():
        if value is None or name not in hints:
            continue
        accepted = _accepted(hints[name])
        if accepted is not None and not _fits(value, accepted):
            expected = " or ".join(t.__name__ for t in _SCALARS if t in accepted)
            where = f"{key}.{name}" if key else name
            raise ConfigError(f"{where}={value!r} is a {type(value).__name__}; expected {expected}")
