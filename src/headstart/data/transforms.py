"""Model-side preprocessing (saved with the model) and training augmentation, as torchvision transforms.

Both run on uint8 tensors, not on PIL images: the decoded image becomes a tensor first, and
torchvision's uint8 resize (SIMD, channels-last) is 3-5x faster than PIL's resize on 2 cores
with the same pixels (bicubic, antialiased: at most 2 of 255 apart on under 1 % of the pixels of
the ant/bee photos and CIFAR-10; benchmarks/decode.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from headstart.core.options import option

# how the pixels are made (part of every feature cache key: rows of another pipeline are not reused)
PIXELS = "torchvision-v2 uint8 resize"


@dataclass(frozen=True)
class Preprocess:
    """Model-side preprocessing, saved in model.json so prediction needs no training options."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875

    @property
    def resize_size(self) -> int:
        """Shorter side before the centre crop."""
        return int(round(self.input_size / self.crop_pct))

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return {
            "input_size": self.input_size,
            "resize_size": self.resize_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        """Inverse of to_dict."""
        return cls(
            input_size=int(d["input_size"]),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            interpolation=d.get("interpolation", "bicubic"),
            crop_pct=float(d.get("crop_pct", 0.875)),
        )


@dataclass(frozen=True)
class Augment:
    """Training augmentations. Defaults follow the tutorials: random resized crop + flip."""

    crop_scale: float = option(
        0.08,
        help="smallest area fraction of RandomResizedCrop",
        group="augmentation (training images)",
        above=0,
        max=1,
    )
    hflip: bool = option(
        True, help="no horizontal flips", flag="--no-hflip", group="augmentation (training images)"
    )
    vflip: bool = option(
        False, help="also flip vertically (e.g. satellite)", group="augmentation (training images)"
    )
    rotation: float = option(
        0.0, help="max rotation in degrees", group="augmentation (training images)", min=0
    )
    color_jitter: float = option(
        0.0, help="brightness/contrast/saturation", group="augmentation (training images)", min=0
    )
    mixup: float = option(
        0.0, help="mixup's Beta alpha (0: off; 0.2 is usual)", group="augmentation (training images)", min=0
    )
    cutmix: float = option(
        0.0, help="CutMix's Beta alpha (0: off; 1 is usual)", group="augmentation (training images)", min=0
    )


def _interp(name: str) -> InterpolationMode:
    try:
        return InterpolationMode(name)
    except ValueError:
        return InterpolationMode.BILINEAR


class _Contiguous:
    """A tensor in its own contiguous memory (crops are views; ONNX Runtime wants C order)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous()


def _to_tensor(pp: Preprocess, *, normalize: bool, uint8: bool) -> list:
    # uint8: the frozen engines normalise themselves, and a quarter of the bytes crosses processes
    if uint8:
        return [_Contiguous()]
    scaled = [T.ToDtype(torch.float32, scale=True)]
    return [*scaled, T.Normalize(pp.mean, pp.std)] if normalize else scaled


def eval_transform(pp: Preprocess, *, normalize: bool = True, uint8: bool = False) -> T.Compose:
    """Resize the shorter side, centre crop, normalise (normalize=False: [0, 1] floats, as exported
    models take them; uint8=True: uint8 [3, H, W], as the frozen engines take them)."""
    ops = [
        T.PILToTensor(),  # a view of the decoded HWC bytes: the channels-last layout the fast resize wants
        T.Resize(pp.resize_size, interpolation=_interp(pp.interpolation), antialias=True),
        T.CenterCrop(pp.input_size),
    ]
    return T.Compose(ops + _to_tensor(pp, normalize=normalize, uint8=uint8))


def train_transform(pp: Preprocess, aug: Augment = Augment(), *, uint8: bool = False) -> T.Compose:
    """Random resized crop (+ flips, rotation, colour jitter if asked), normalise (or uint8)."""
    ops: list = [
        T.PILToTensor(),
        T.RandomResizedCrop(
            pp.input_size,
            scale=(aug.crop_scale, 1.0),
            interpolation=_interp(pp.interpolation),
            antialias=True,
        ),
    ]
    if aug.hflip:
        ops.append(T.RandomHorizontalFlip())
    if aug.vflip:
        ops.append(T.RandomVerticalFlip())
    if aug.rotation:
        ops.append(T.RandomRotation(aug.rotation, interpolation=InterpolationMode.BILINEAR))
    if aug.color_jitter:
        j = aug.color_jitter
        ops.append(T.ColorJitter(brightness=j, contrast=j, saturation=j, hue=min(0.5, j / 4)))
    return T.Compose(ops + _to_tensor(pp, normalize=True, uint8=uint8))
