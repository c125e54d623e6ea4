"""Pass registry and string specs.

A spec is ``"name"`` or ``"name:key=value,key=value"``; values are parsed by the type of the
pass's dataclass field (``bool``: true/false/1/0/yes/no; ``int``; ``float``; ``str``; a
``tuple`` field takes ``a|b|c``). Unknown names and options raise :class:`PassSpecError`
suggesting the closest valid one. The CLI uses the same strings.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from typing import Any

from graphpress.graph.errors import PassSpecError

from .base import Pass

__all__ = ["register", "registered", "from_spec", "to_spec", "describe"]

logger = logging.getLogger(__name__)

_PASSES: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make ``cls`` constructible from its ``name``."""
    if cls.name in _PASSES and _PASSES[cls.name] is not cls:
        raise PassSpecError(f"two passes are named {cls.name!r}: {_PASSES[cls.name]} and {cls}")
    _PASSES[cls.name] = cls
    return cls


def registered() -> dict[str, type[Pass]]:
    """All registered passes by name (sorted)."""
    _load_builtin_passes()
    return dict(sorted(_PASSES.items()))


def _load_builtin_passes() -> None:
    from . import (  # noqa: F401 (importing registers the passes)
        cleanup,
        cpu_layernorm,
        fold,
        fuse_attention,
        low_rank,
        partition,
        prune,
        quantize,
        sparsify,
    )


def _suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _options(cls: type[Pass]) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def from_spec(spec: str | Pass) -> Pass:
    """Build a pass from ``"name"`` or ``"name:key=value,..."`` (a Pass is returned as is)."""
    if isinstance(spec, Pass):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise PassSpecError(f"a pass spec must be a non-empty string, got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    passes = registered()
    if name not in passes:
        raise PassSpecError(
            f"unknown pass {name!r}{_suggest(name, passes)} (run 'graphpress passes' for the list)"
        )
    cls = passes[name]
    options = _options(cls)
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep:
            raise PassSpecError(f"pass {name!r}: option {item!r} needs a value (key=value)")
        if key not in options:
            valid = ", ".join(options) or "none"
            raise PassSpecError(
                f"pass {name!r} has no option {key!r}{_suggest(key, options)} (options: {valid})"
            )
        kwargs[key] = _parse_value(name, key, raw.strip(), hints.get(key, str))
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise PassSpecError(f"pass {name!r}: {exc}") from None


def _parse_value(pass_name: str, key: str, raw: str, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        if raw.lower() in ("none", "null", ""):
            return None
        hint, origin = args[0], typing.get_origin(args[0])
    if origin is typing.Literal:
        allowed = typing.get_args(hint)
        if raw not in allowed:
            raise PassSpecError(
                f"pass {pass_name!r}: option {key}={raw!r} must be one of {', '.join(map(str, allowed))}"
                f"{_suggest(raw, map(str, allowed))}"
            )
        return raw
    if origin is tuple:
        return tuple(part for part in raw.split("|") if part)
    try:
        if hint is bool:
            lowered = raw.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return lowered in ("true", "1", "yes")
        if hint in (int, float, str):
            return hint(raw)
    except ValueError:
        raise PassSpecError(
            f"pass {pass_name!r}: option {key}={raw!r} is not a valid {hint.__name__}"
        ) from None
    return raw


def to_spec(pass_: Pass) -> str:
    """The spec string of ``pass_`` listing the options that differ from their defaults."""
    parts = []
    for field in dataclasses.fields(pass_):
        value = getattr(pass_, field.name)
        if field.default is not dataclasses.MISSING and value == field.default:
            continue
        if isinstance(value, bool):
            text = str(value).lower()
        elif isinstance(value, tuple):
            text = "|".join(map(str, value))
        else:
            text = str(value)
        parts.append(f"{field.name}={text}")
    return pass_.name + (":" + ",".join(parts) if parts else "")


def describe() -> list[dict[str, Any]]:
    """One entry per registered pass: name, supported kinds, summary, options with defaults."""
    rows = []
    for name, cls in registered().items():
        doc = (cls.__doc__ or "").strip().splitlines()
        hints = typing.get_type_hints(cls)
        options = []
        for key, field in _options(cls).items():
            default = field.default if field.default is not dataclasses.MISSING else None
            options.append({"name": key, "type": _type_name(hints.get(key)), "default": default})
        rows.append(
            {
                "name": name,
                "supports": sorted(cls.supports),
                "summary": doc[0] if doc else "",
                "options": options,
            }
        )
    return rows


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "|".join(map(str, typing.get_args(hint)))
    return getattr(hint, "__name__", str(hint))
