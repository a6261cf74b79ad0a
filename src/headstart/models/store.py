"""The stored model: model.safetensors (weights) + model.json (classes, backbone config, head,
preprocessing, temperature), everything needed to use the weights without the training options."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from headstart.core.errors import DataError
from headstart.core.files import MODEL_JSON, WEIGHTS, atomic_write_bytes, read_json, write_json
from headstart.data.transforms import Preprocess
from headstart.models.backbones import backbone_from_config
from headstart.models.config import BackboneConfig
from headstart.models.heads import HeadSpec
from headstart.models.transfer import TransferModel

MODEL_FORMAT = 1


def save_weights(path: str | os.PathLike, state: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    """Save a state dict as safetensors, atomically."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    atomic_write_bytes(path, save(tensors, metadata={k: str(v) for k, v in (meta or {}).items()}))


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors state dict with an error that names the file."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError as e:
        raise DataError(f"Weights {str(path)!r} not found; the run did not finish saving.") from e
    except Exception as e:  # noqa: BLE001 - safetensors raises several kinds on damage
        raise DataError(
            f"Weights {str(path)!r} are damaged or not safetensors ({type(e).__name__}: {e}). "
            "Re-run training or restore the file."
        ) from e


def model_record(
    model: TransferModel, preprocess: Preprocess, *, strategy: str, temperature: float = 1.0
) -> dict:
    """model.json: what is needed to use the weights without the training config."""
    from headstart import __version__

    return {
        "format": MODEL_FORMAT,
        "headstart_version": __version__,
        "classes": list(model.classes),
        "backbone": model.backbone.config.to_dict(),
        "head": model.head_spec.to_dict(),
        "preprocessing": preprocess.to_dict(),
        "strategy": strategy,
        "temperature": temperature,
    }


def save_model(
    run_dir: str | os.PathLike,
    model: TransferModel,
    preprocess: Preprocess,
    *,
    strategy: str,
    temperature: float | None = None,
) -> None:
    """Write model.safetensors and model.json; the temperature already stored is kept unless given."""
    run_dir = Path(run_dir)
    save_weights(run_dir / WEIGHTS, model.state_dict(), {"format": MODEL_FORMAT})
    old = run_dir / MODEL_JSON
    if temperature is None:
        temperature = read_json(old).get("temperature", 1.0) if old.exists() else 1.0
    write_json(
        run_dir / MODEL_JSON, model_record(model, preprocess, strategy=strategy, temperature=temperature)
    )


def set_temperature(run_dir: str | os.PathLike, temperature: float) -> None:
    """Store a calibrated temperature in model.json (predict divides logits by it)."""
    path = Path(run_dir) / MODEL_JSON
    record = read_json(path)
    record["temperature"] = float(temperature)
    write_json(path, record)


def load_model(run_dir: str | os.PathLike) -> tuple[TransferModel, Preprocess, dict]:
    """The stored model (CPU, eval mode), its preprocessing and its model.json record."""
    run_dir = Path(run_dir)
    record = read_json(run_dir / MODEL_JSON)
    backbone = backbone_from_config(BackboneConfig.from_dict(record["backbone"]))
    model = TransferModel.build(backbone, HeadSpec.from_dict(record["head"]), record["classes"])
    missing, unexpected = model.load_state_dict(load_weights(run_dir / WEIGHTS), strict=False)
    if missing or unexpected:
        raise DataError(
            f"{str(run_dir / WEIGHTS)!r} does not match {str(run_dir / MODEL_JSON)!r}: "
            f"{len(missing)} missing and {len(unexpected)} unexpected tensors "
            f"(e.g. {', '.join((missing + unexpected)[:3])}). The run folder is inconsistent."
        )
    return model.eval(), Preprocess.from_dict(record["preprocessing"]), record
