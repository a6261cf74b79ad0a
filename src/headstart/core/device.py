"""Device choice (CUDA, then MPS, then CPU) and the per-device fast paths."""

from __future__ import annotations

import contextlib
import os

import torch

from headstart.core.errors import ConfigError


def pick_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA, then Apple MPS, then CPU; an explicit name is checked."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"Unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps.") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name} asked for CUDA, but no CUDA GPU is visible. Use --device auto.")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"--device {name} asked for MPS, which is not available here. Use --device auto.")
    return dev


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def configure_threads() -> int:
    """Use every core this process may run on for intra-op math; returns the count."""
    n = available_cores()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a batch; non-blocking from pinned memory on CUDA."""
    return x.to(device, non_blocking=device.type == "cuda")


def autocast_for(device: torch.device, *, training: bool = False):
    """bf16 autocast on CUDA (fp16 for inference on older GPUs); full precision elsewhere.

    Training never uses fp16 autocast: it would need loss scaling, and bf16 does not.
    """
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.autocast("cuda", dtype=torch.bfloat16)
        if not training:
            return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()
