"""headstart's logging and progress bars.

The library logs to `logging.getLogger("headstart")` and is silent by default (a NullHandler, as
libraries should); the CLI calls `configure` to print INFO lines on stderr (`-q` warnings only,
`-v` debug). Progress bars show only when INFO is enabled: live tqdm bars on a terminal; in a log
file (stderr not a terminal) one log line every 30 s instead of carriage-return noise.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator

from tqdm.auto import tqdm

logger = logging.getLogger("headstart")
logger.addHandler(logging.NullHandler())
LOG_EVERY = 30.0  # seconds between progress lines when stderr is not a terminal


class _TqdmHandler(logging.StreamHandler):
    """Writes records through tqdm so they do not break a live bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def configure(verbosity: int = 0, *, stream=None) -> None:
    """Send headstart's log to stderr: -1 warnings only, 0 info (the CLI default), 1+ debug."""
    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    for h in [h for h in logger.handlers if isinstance(h, _TqdmHandler)]:
        logger.removeHandler(h)
    handler = _TqdmHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def is_main_process() -> bool:
    """Rank 0 of a torchrun job (or a plain process): the one that logs and shows progress."""
    return os.environ.get("RANK", "0") == "0"


def info(msg: str, *args) -> None:
    """An INFO line from rank 0."""
    if is_main_process():
        logger.info(msg, *args)


def warning(msg: str, *args) -> None:
    """A WARNING line from rank 0."""
    if is_main_process():
        logger.warning(msg, *args)


class _LogLines:
    """tqdm's interface, reporting as a log line at most every LOG_EVERY seconds (for log files)."""

    def __init__(self, iterable, total: int | None, desc: str, unit: str):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n, self.start = 0, time.perf_counter()
        self.last, self.postfix = self.start, ""

    def __iter__(self) -> Iterator:
        for x in self.iterable:
            yield x
            self.update(1)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= LOG_EVERY:
            self.last = now
            of = f"/{self.total}" if self.total else ""
            rate = self.n / max(now - self.start, 1e-9)
            logger.info(
                "%s: %d%s %s (%.1f %s/s)%s", self.desc, self.n, of, self.unit, rate, self.unit, self.postfix
            )

    def set_postfix(self, **kw) -> None:
        self.postfix = " " + " ".join(f"{k}={v}" for k, v in kw.items())

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Off(_LogLines):
    def update(self, n: int = 1) -> None:
        self.n += n


def progress(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    enabled: bool = True,
):
    """The one progress bar: tqdm on a terminal, periodic log lines otherwise, nothing when quiet."""
    if not (enabled and is_main_process() and logger.isEnabledFor(logging.INFO)):
        return _Off(iterable if iterable is not None else (), total, desc, unit)
    if not sys.stderr.isatty():
        return _LogLines(iterable if iterable is not None else (), total, desc, unit)
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True)
