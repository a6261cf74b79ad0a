"""Options declared once: a dataclass field carries its type, default, help, choices, bounds and CLI
group; the CLI builds its parsers from these fields and `check_fields` validates them."""

from __future__ import annotations

import dataclasses
import operator
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


def check_fields(obj: Any) -> None:
    """Check every option field of a dataclass instance against its choices and bounds."""
    from headstart.core.errors import did_you_mean

    for f in dataclasses.fields(obj):
        v, m = getattr(obj, f.name), f.metadata
        if v is None or "help" not in m:
            continue
        flag = flag_of(f).replace("--no-", "--")
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
