"""The PIL preprocessing headstart used until 2026-12-07 (resize and crop on PIL images), kept as
the baseline of the benchmarks that measure what replacing it bought."""

from __future__ import annotations

from torchvision import transforms as v1

from headstart.data.transforms import Preprocess, _interp


def pil_eval(pp: Preprocess, *, uint8: bool) -> v1.Compose:
    """Resize the shorter side and centre-crop on PIL; then uint8 [3, H, W], or normalised floats."""
    ops = [v1.Resize(pp.resize_size, interpolation=_interp(pp.interpolation)), v1.CenterCrop(pp.input_size)]
    tail = [v1.PILToTensor()] if uint8 else [v1.ToTensor(), v1.Normalize(pp.mean, pp.std)]
    return v1.Compose(ops + tail)
