"""One serialiser for every configuration dataclass: JSON-ready dicts out, typed dataclasses back in.

Configurations are dataclasses that inherit :class:`ConfigMixin`. ``to_dict`` gives plain JSON types (nested
dataclasses as dicts, tuples as lists); ``from_dict`` reads that back using the field annotations, so nested
configurations, tuples and ``X | None`` fields round-trip without hand-written code. Keys the class does not know are
an error (a checkpoint from an incompatible version must not load silently); keys it lacks take their defaults, which
lets older files load after a field is added.

This module imports nothing of portrait3d but :mod:`portrait3d.errors`: every layer may use it.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, TypeVar, Union

from portrait3d.errors import UsageError

__all__ = ["ConfigMixin", "config_to_dict", "config_from_dict"]

T = TypeVar("T")


def _to_json(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return config_to_dict(v)
    if isinstance(v, (list, tuple)):
        return [_to_json(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _to_json(x) for k, x in v.items()}
    if hasattr(v, "item") and callable(v.item):  # numpy / torch scalars
        return v.item()
    return v


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass instance as a JSON-ready ``dict`` (nested dataclasses as dicts, tuples as lists).

    A field's value is serialised by its own ``to_dict`` when it has one, so a class can extend the format.
    """
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = v.to_dict() if isinstance(v, ConfigMixin) else _to_json(v)
    return json.loads(json.dumps(out))


def _strip_optional(tp: Any) -> Any:
    """``X | None`` -> ``X`` (other unions unchanged)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _from_json(tp: Any, v: Any, where: str) -> Any:
    if v is None:
        return None
    tp = _strip_optional(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(v, dict):
            raise UsageError(f"{where}: expected a mapping for {tp.__name__}, got {type(v).__name__}")
        return tp.from_dict(v) if issubclass(tp, ConfigMixin) else config_from_dict(tp, v, where)
    origin = typing.get_origin(tp)
    if origin is tuple or tp is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_json(args[0], x, where) for x in v)
        if args and len(args) == len(v):
            return tuple(_from_json(a, x, where) for a, x in zip(args, v))
        return tuple(v)
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return [_from_json(arg, x, where) for x in v]
    if tp is float and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    return v


def config_from_dict(cls: type[T], d: dict[str, Any], where: str | None = None) -> T:
    """Build the dataclass ``cls`` from a dict written by :func:`config_to_dict` (see the module docstring)."""
    where = where or cls.__name__
    if not isinstance(d, dict):
        raise UsageError(f"{where}: expected a mapping, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise UsageError(f"{where}: unknown field(s) {', '.join(unknown)}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _from_json(hints.get(k, Any), v, f"{where}.{k}") for k, v in d.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise UsageError(f"{where}: {e}") from None


class ConfigMixin:
    """``to_dict`` / ``from_dict`` for a configuration dataclass (see the module docstring)."""

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    @classmethod
    def from_dict(cls: type[T], d: dict[str, Any]) -> T:
        return config_from_dict(cls, d)
