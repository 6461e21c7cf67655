"""Whether a config value fits its dataclass field's type hint (int | None, list[float], bool, ...).

The training configs check their fields with it when built (from Python: a batch size of 2.5 or
"8" failed deep inside torch), and the CLI checks a --config JSON file or a resumed config.json
with it (a string "false" for a bool field was stored as given and read as true).
"""

from __future__ import annotations

import dataclasses
import types
import typing

import numpy as np

from vigface.errors import VigfaceError


def matches(value, hint) -> bool:
    """Whether `value` fits the type hint `hint`; a hint this check does not know always fits."""
    if isinstance(hint, types.UnionType):
        return any(matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) is list:
        return isinstance(value, list) and all(matches(v, typing.get_args(hint)[0]) for v in value)
    if hint is bool:
        return isinstance(value, (bool, np.bool_))
    if hint is int:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if hint in (str, dict):
        return isinstance(value, hint)
    return True  # the config's own validation decides


def type_name(hint) -> str:
    return str(hint).replace("typing.", "") if not isinstance(hint, type) else hint.__name__


def check_field_types(config, what: str) -> None:
    """Raise, naming the field, unless every field of the dataclass `config` fits its type hint."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in hints and not matches(value, hints[f.name]):
            raise VigfaceError(f"{what}: {f.name} must be of type {type_name(hints[f.name])}, got {value!r}")
