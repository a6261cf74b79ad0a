"""BackboneConfig: everything a user of a backbone needs besides its tensors (cf. timm's PretrainedCfg)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

DEFAULT_BACKBONE = "efficientnet_lite0"


@dataclass(frozen=True)
class BackboneConfig:
    """Name, source, preprocessing and feature width of a backbone; saved in model.json."""

    name: str
    source: str  # embedded | torchvision | timm | hf
    arch: str  # architecture id inside its source library
    input_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    feature_dim: int = 0
    weights: str = "none"  # where the weights came from: a path, or "none"
    feature_blocks: int = 1  # >1: also average-pool the outputs of the last blocks (with_feature_blocks)

    def to_dict(self) -> dict:
        """Plain-JSON form (tuples become lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> BackboneConfig:
        """Inverse of to_dict; ignores unknown keys so older/newer model.json files still load."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for k in ("mean", "std"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw)
