"""Reading weight files safely and fitting state dicts onto architectures."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from headstart.core.errors import WeightsError, loader_message


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a .safetensors or .pth/.pt/.bin state dict safely (never unpickles code)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"Weights file {str(path)!r} does not exist. Check the path.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any parse failure becomes one clear message
        raise WeightsError(
            f"Could not read weights file {str(path)!r}: {type(e).__name__}: "
            f"{loader_message(e)}. headstart loads only tensors "
            "(safetensors, or torch.save'd state dicts with weights_only=True); a file that "
            "needs arbitrary code to unpickle is refused."
        ) from e
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{str(path)!r} does not hold a state dict of tensors.")
    return {re.sub(r"^(module\.|model\.)", "", k): v for k, v in sd.items()}


def load_into(model: nn.Module, sd: dict[str, torch.Tensor], path: Path, name: str, *,
              with_classifier: bool = True) -> None:  # fmt: skip
    """Load matching tensors; the classifier may differ, anything else missing is an error."""
    own = model.state_dict()
    usable = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in usable and not k.endswith("num_batches_tracked")]
    classifier = classifier_keys(model) if with_classifier else set()
    real_missing = [k for k in missing if k not in classifier]
    if real_missing:
        raise WeightsError(
            f"Weights file {str(path)!r} does not fit {name}: {len(real_missing)} of {len(own)} "
            f"tensors are missing or have another shape (e.g. {', '.join(real_missing[:3])}). "
            f"Pass weights saved from the same architecture."
        )
    model.load_state_dict(usable, strict=False)


def last_linear(model: nn.Module) -> str | None:
    """Name of the last nn.Linear (the classifier of a classification network), if any."""
    last = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            last = name
    return last


def classifier_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the classifier (the last nn.Linear)."""
    last = last_linear(model)
    return {f"{last}.weight", f"{last}.bias"} if last else set()


def map_lukemelas_state_dict(
    src: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename a lukemelas EfficientNet state dict onto timm's keys by order, checking every shape."""
    if len(src) != len(target):
        raise WeightsError(
            f"The EfficientNet weights have {len(src)} tensors but the timm model expects "
            f"{len(target)}; they are not the same architecture."
        )
    out = {}
    for (sk, sv), (tk, tv) in zip(src.items(), target.items(), strict=True):
        if sv.shape != tv.shape:
            raise WeightsError(
                f"Tensor {sk!r} has shape {tuple(sv.shape)} but timm's {tk!r} expects "
                f"{tuple(tv.shape)}; the weights do not match this architecture."
            )
        out[tk] = sv
    return out
