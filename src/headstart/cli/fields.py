"""argparse options generated from dataclass fields declared with `headstart.core.options.option`:
the flag, type, default, help, choices and group come from the field, never written twice."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable
from typing import Any

from headstart.core.options import choices_of, flag_of


def _base_type(t: Any) -> Any:
    """X for `X | None`, else t."""
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        return args[0] if len(args) == 1 else t
    return t


def option_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    """(field, resolved type) of every option of `cls`, nested dataclass options flattened in."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        t = _base_type(hints[f.name])
        if dataclasses.is_dataclass(t):
            out += option_fields(t)
        else:
            out.append((f, t))
    return out


def add_fields(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    only: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    defaults: dict[str, Any] | None = None,
    positional: Iterable[str] = (),
    suppress: bool = False,
) -> list[str]:
    """Add an argparse option per field of `cls`; returns the dests added.

    suppress=True leaves options the user did not give out of the namespace (so a --config file
    can supply them); the declared default is still shown in --help.
    """
    only = set(only) if only is not None else None
    exclude, defaults, positional = set(exclude), defaults or {}, set(positional)
    groups: dict[str, Any] = {}
    dests = []
    for f, t in option_fields(cls):
        if (only is not None and f.name not in only) or f.name in exclude:
            continue
        m = f.metadata
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else None)
        group = groups.setdefault(m["group"], parser.add_argument_group(m["group"])) if m["group"] else parser
        kw: dict[str, Any] = {"help": m["help"], "dest": f.name}
        if t is bool:
            kw["action"] = "store_false" if flag_of(f).startswith("--no-") else "store_true"
        elif typing.get_origin(t) is tuple:
            kw.update(action="append", metavar=m["metavar"] or "VALUE")
        else:
            kw.update(type=t, metavar=m["metavar"], choices=choices_of(f))
            if default is not None and t is not bool:
                kw["help"] += f" (default: {default})"
        kw["default"] = (
            argparse.SUPPRESS if suppress else (list(default) if isinstance(default, tuple) else default)
        )
        if f.name in positional or flag_of(f) == "data":
            kw.pop("dest")
            kw.pop("metavar", None)
            group.add_argument(f.name, nargs="?", **kw)
        else:
            names = [flag_of(f)] + ([m["short"]] if m["short"] else [])
            group.add_argument(*names, **kw)
        dests.append(f.name)
    return dests


def given(ns: argparse.Namespace, dests: Iterable[str]) -> dict[str, Any]:
    """The values of `dests` present in the namespace (with suppress=True: the ones the user gave)."""
    return {d: getattr(ns, d) for d in dests if hasattr(ns, d)}
