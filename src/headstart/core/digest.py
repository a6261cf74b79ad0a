"""Checksums of tensor contents: the frozen proof, cache keys and checkpoint feature identity."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def tensor_checksum(t: torch.Tensor) -> str:
    """A 128-bit checksum of one tensor's bytes."""
    return hashlib.blake2b(_bytes(t), digest_size=16).hexdigest()


def tensors_checksum(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """One checksum over named tensors, names included (order matters)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in named:
        h.update(name.encode())
        h.update(_bytes(t))
    return h.hexdigest()
