"""Options declared once: a dataclass field carries its type, default, help, choices, bounds and CLI
group; the CLI builds its parsers from these fields and `check_fields` validates them."""

from __future__ import annotations

import dataclasses
import operator
import os
import typing
from collections.abc import Callable, Sequence
from typing import Any

from headstart.core.errors import ConfigError


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    group: str = "",
    flag: str | None = None,
    short: str | None = None,
    choices: Sequence[str] | Callable[[], Sequence[str]] | None = None,
    min: float | None = None,
    max: float | None = None,
    above: float | None = None,
    below: float | None = None,
    metavar: str | None = None,
    default_factory: Callable[[], Any] | None = None,
) -> Any:
    """A dataclass field with its CLI and validation metadata.

    `flag` overrides the flag name (e.g. '--workers', '--no-cache' for a True-by-default bool);
    `min`/`max` are inclusive bounds, `above`/`below` exclusive; None values skip the checks.
    """
    meta = {
        "help": help,
        "group": group,
        "flag": flag,
        "short": short,
        "choices": choices,
        "min": min,
        "max": max,
        "above": above,
        "below": below,
        "metavar": metavar,
    }
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def choices_of(f: dataclasses.Field) -> list[str] | None:
    """The allowed values of an option field (resolving a callable), or None."""
    c = f.metadata.get("choices")
    if c is None:
        return None
    return list(c() if callable(c) else c)


def flag_of(f: dataclasses.Field) -> str:
    """The option's CLI flag: its `flag` metadata or --field-name."""
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


_BOUNDS = {"min": ">=", "max": "<=", "above": ">", "below": "<"}
_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}


def checked(obj: Any) -> Any:
    """A copy of a dataclass instance with every option field type-checked (numbers given as text,
    as YAML reads 1e-3, are converted) and checked against its choices and bounds; ConfigError."""
    from headstart.core.errors import did_you_mean

    hints = typing.get_type_hints(type(obj))
    values = {}
    for f in dataclasses.fields(obj):
        v, m = getattr(obj, f.name), f.metadata
        if "help" not in m or dataclasses.is_dataclass(v):
            continue
        flag = _label(f)
        v = values[f.name] = _typed(flag, v, hints[f.name])
        if v is None:
            continue
        choices = choices_of(f)
        if choices is not None and v not in choices:
            raise ConfigError(
                f"{flag} {v!r} is not a valid choice; use one of {', '.join(choices)}."
                + did_you_mean(str(v), choices)
            )
        for key, sign in _BOUNDS.items():
            b = m.get(key)
            if b is not None and isinstance(v, int | float) and not _OPS[sign](v, b):
                raise ConfigError(f"{flag} has an invalid value: {v} (must be {sign} {b:g}).")
    return dataclasses.replace(obj, **values)


def _label(f: dataclasses.Field) -> str:
    """How an error names an option: its flag, with the field name where they differ."""
    flag = flag_of(f)
    if flag == "--" + f.name.replace("_", "-"):
        return flag
    return f"{f.name} ({flag})" if flag.startswith("-") else f.name


def _typed(flag: str, v: Any, hint: Any) -> Any:
    """`v` as the field's type: int, float, str, bool, tuple of str, each optionally None."""
    optional = type(None) in typing.get_args(hint)
    kind = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    if v is None:
        if optional:
            return None
        raise ConfigError(f"{flag} cannot be empty (null).")
    if typing.get_origin(kind) is tuple:
        if isinstance(v, str) or not all(isinstance(x, str) for x in v):
            raise ConfigError(f"{flag} expects a list of strings; received {v!r}.")
        return tuple(v)
    if kind is bool:
        if not isinstance(v, bool):
            raise ConfigError(f"{flag} is true or false; received {v!r}.")
        return v
    if kind in (int, float):
        wanted = "an integer" if kind is int else "a number"
        if isinstance(v, str):  # e.g. YAML reads 1e-3 (no dot) as text
            try:
                v = kind(v)
            except ValueError:
                raise ConfigError(f"{flag} expects {wanted}; received {v!r}.") from None
        if isinstance(v, bool) or not isinstance(v, int | float) or (kind is int and v != int(v)):
            raise ConfigError(f"{flag} expects {wanted}; received {v!r}.")
        return kind(v)
    if kind is str and isinstance(v, os.PathLike):  # paths are options too: data, output, val, ...
        return os.fspath(v)
    if kind is str and not isinstance(v, str):
        raise ConfigError(f"{flag} expects text; received {v!r}.")
    return v
