"""Progress bars: live on a terminal; in logs, one line every 30 seconds instead of a flood."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def bar(iterable=None, *, total: int | None = None, desc: str = "", unit: str = "it", enabled: bool = True):
    """A tqdm bar on stderr; when stderr is not a terminal, updates at most every 30 s."""
    tty = sys.stderr.isatty()
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        leave=False,
        file=sys.stderr,
        disable=not enabled,
        mininterval=0.1 if tty else 30.0,
        dynamic_ncols=tty,
    )
