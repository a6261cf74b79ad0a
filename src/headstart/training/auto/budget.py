"""Time budgets: '10m', '1h30m', '90s' -> seconds, and a clock the tests can replace."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from headstart.core.errors import ConfigError

_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text: str | float | int) -> float:
    """Seconds in '90s', '10m', '1h', '1h30m' or a bare number of seconds; ConfigError otherwise."""
    compact = str(text).strip().lower().replace(" ", "")
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms]?)", compact)
    if (
        not compact
        or "".join(n + u for n, u in parts) != compact
        or (len(parts) > 1 and not all(u for _, u in parts))
    ):
        raise ConfigError(f"--budget {text!r} is not a duration; write it as 90s, 10m, 1h or 1h30m.")
    seconds = sum(float(n) * _UNITS[u or "s"] for n, u in parts)
    if seconds < 30:
        raise ConfigError(
            f"--budget {text!r} is under 30 seconds: too short to train anything; give 1m or more."
        )
    return seconds


@dataclass
class Budget:
    """A deadline: `seconds` from when it was made, on `clock` (time.monotonic unless a test fakes it)."""

    seconds: float
    clock: Callable[[], float] = time.monotonic
    start: float = field(default=-1.0)

    def __post_init__(self) -> None:
        if self.start < 0:
            self.start = self.clock()

    @property
    def deadline(self) -> float:
        """The clock reading at which the budget is spent."""
        return self.start + self.seconds

    def spent(self) -> float:
        """Seconds used so far."""
        return self.clock() - self.start

    def left(self) -> float:
        """Seconds left (negative when over)."""
        return self.seconds - self.spent()
