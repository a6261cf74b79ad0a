"""Timing a step: images per second, measured the same way by `headstart bench` and the planner."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def images_per_second(step: Callable[[], object], batch: int, *, min_seconds: float, device: torch.device,
                      min_steps: int = 2) -> float:  # fmt: skip
    """Run `step` (one batch of `batch` images) once to warm up, then for at least `min_seconds`."""
    step()  # warm-up: allocator, kernel selection
    n, start = 0, time.perf_counter()
    while True:
        step()
        n += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds and n >= min_steps:
            return n * batch / elapsed
