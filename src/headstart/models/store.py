"""The stored model: model.safetensors (weights) + model.json (classes, backbone config, head,
preprocessing, temperature), everything needed to use the weights without the training options."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from headstart.core.errors import DataError
from headstart.core.files import (
    MODEL_JSON,
    WEIGHTS,
    atomic_write_bytes,
    read_json,
    require_finished,
    write_json,
)
from headstart.data.transforms import Preprocess
from headstart.models.backbones import backbone_from_config
from headstart.models.config import BackboneConfig
from headstart.models.heads import HEAD_KINDS, HeadSpec
from headstart.models.transfer import TransferModel
from headstart.models.tta import TTA_CHOICES

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
        "tta": model.tta,
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


def load_model(run_dir: str | os.PathLike) -> tuple[TransferModel, Preprocess, dict]:
    """The stored model (CPU, eval mode), its preprocessing and its model.json record.

    model.json is checked against its schema and against the weights' shapes before anything runs:
    a changed or damaged file is one paragraph naming the key, never a traceback.
    """
    run_dir = Path(run_dir)
    require_finished(run_dir)
    path = run_dir / MODEL_JSON
    record = read_json(path)
    validate_record(record, path)
    try:
        backbone = backbone_from_config(BackboneConfig.from_dict(record["backbone"]))
    except Exception as e:  # noqa: BLE001 - timm/torchvision raise several kinds for unknown names
        raise DataError(
            f"{str(path)!r}: backbone.arch {record['backbone']['arch']!r} ({record['backbone']['source']}) "
            f"cannot be built here ({type(e).__name__}: {e}). Restore model.json, or install the library "
            "version that trained it (config.json lists the versions)."
        ) from e
    model = TransferModel.build(backbone, HeadSpec.from_dict(record["head"]), record["classes"])
    state = load_weights(run_dir / WEIGHTS)
    check_shapes(model.state_dict(), state, path, run_dir / WEIGHTS)
    model.load_state_dict(state)
    model.tta = record.get("tta", "none")
    return model.eval(), Preprocess.from_dict(record["preprocessing"]), record


def check_shapes(
    own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], record: Path, weights: Path
) -> None:
    """The weights file holds exactly the tensors model.json describes, shape for shape."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        detail = "; ".join(
            [
                f"{k}: weights {tuple(state[k].shape)}, model.json implies {tuple(own[k].shape)}"
                for k in wrong[:3]
            ]
            + ([f"{len(missing)} missing (e.g. {missing[0]})"] if missing else [])
            + ([f"{len(unexpected)} unexpected (e.g. {unexpected[0]})"] if unexpected else [])
        )
        raise DataError(
            f"{str(weights)!r} does not match {str(record)!r}: {detail}. One of the two was changed or "
            "comes from another run: restore both from the same run, or train again."
        )


_ABSENT = object()
_OPTIONAL = object()  # the default of keys a model.json may lack (e.g. before `calibrate`)
# model.json keys: (dotted key, check, what is expected, default where older files may lack the key)
_SCHEMA: list[tuple] = [
    ("classes", lambda v: isinstance(v, list) and len(v) >= 2 and all(isinstance(c, str) for c in v)
     and len(set(v)) == len(v), "a list of at least 2 distinct class names", _ABSENT),
    ("backbone.source", lambda v: v in ("embedded", "torchvision", "timm", "hf"),
     "one of embedded, torchvision, timm, hf", _ABSENT),
    ("backbone.name", lambda v: isinstance(v, str) and v != "", "a backbone name", _ABSENT),
    ("backbone.arch", lambda v: isinstance(v, str) and v != "", "an architecture name", _ABSENT),
    ("backbone.feature_blocks", lambda v: _int(v, 1), "an integer >= 1", 1),
    ("head.kind", lambda v: v in HEAD_KINDS, f"one of {', '.join(HEAD_KINDS)}", _ABSENT),
    ("head.hidden", lambda v: isinstance(v, list) and all(_int(h, 1) for h in v), "positive integers", []),
    ("head.dropout", lambda v: _num(v) and 0 <= v < 1, "a number in [0, 1)", 0.0),
    ("preprocessing.input_size", lambda v: _int(v, 16), "an integer >= 16", _ABSENT),
    ("preprocessing.mean", lambda v: _triple(v), "3 numbers", _ABSENT),
    ("preprocessing.std", lambda v: _triple(v) and min(v) > 0, "3 numbers above 0", _ABSENT),
    ("preprocessing.crop_pct", lambda v: _num(v) and 0 < v <= 1, "a number in (0, 1]", 0.875),
    ("tta", lambda v: v in TTA_CHOICES, f"one of {', '.join(TTA_CHOICES)}", "none"),
    ("temperature", lambda v: _num(v) and v > 0, "a positive finite number (1.0 when not calibrated)", 1.0),
    ("conformal.method", lambda v: v in ("lac", "aps"), "lac or aps", _OPTIONAL),
    ("conformal.coverage", lambda v: _num(v) and 0 < v < 1, "a number in (0, 1)", _OPTIONAL),
    ("conformal.threshold", lambda v: _num(v) and v >= 0, "a number >= 0", _OPTIONAL),
    ("conformal.calibration_images", lambda v: _int(v, 0), "an integer >= 0", _OPTIONAL),
    ("ood.threshold", lambda v: _num(v) and v >= 0, "a number >= 0", _OPTIONAL),
    ("ood.accept", lambda v: _num(v) and 0 < v < 1, "a number in (0, 1)", _OPTIONAL),
    ("ood.calibration_images", lambda v: _int(v, 0), "an integer >= 0", _OPTIONAL),
    ("ood.train_images", lambda v: _int(v, 0), "an integer >= 0", _OPTIONAL),
    ("ood.feature_dim", lambda v: _int(v, 1), "an integer >= 1", _OPTIONAL),
    ("ood.file", lambda v: isinstance(v, str) and "/" not in v and v not in ("", ".", ".."),
     "a file name in the run folder", _OPTIONAL),
]  # fmt: skip


def validate_record(record: object, path: Path) -> None:
    """model.json against its schema: each problem names the file, the key and what was expected."""
    for key, ok, expected, default in _SCHEMA:
        value = record
        for part in key.split("."):
            value = value.get(part, default) if isinstance(value, dict) else _ABSENT
            if value is _OPTIONAL:
                break
        if value is _OPTIONAL:
            continue
        if value is _ABSENT or not ok(value):
            found = "nothing" if value is _ABSENT else repr(value)
            raise DataError(
                f"{str(path)!r}: {key} must be {expected}; found {found}. The file was changed or damaged: "
                "restore it from the run, or train again."
            )


def _num(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _int(v: object, minimum: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _triple(v: object) -> bool:
    return isinstance(v, list) and len(v) == 3 and all(_num(x) for x in v)
