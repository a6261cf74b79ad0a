"""The run folder contract: atomic file writes and the saved model (safetensors + model.json)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from headstart.errors import DataError

MODEL_FORMAT = 1
CONFIG, METRICS, RESULTS, SPLIT = "config.json", "metrics.csv", "results.json", "split.json"
WEIGHTS, MODEL_JSON = "model.safetensors", "model.json"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temp file in the same folder, fsync, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with_suppress_unlink(tmp)
        raise


def with_suppress_unlink(path: str) -> None:
    """Remove a temp file if it is still there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def write_json(path: str | os.PathLike, obj) -> None:
    """Pretty JSON, written atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def read_json(path: str | os.PathLike) -> dict:
    """Read a JSON file with an error that names it."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise DataError(
            f"{str(path)!r} not found: is {str(path.parent)!r} a headstart run folder "
            "(made by `headstart train --output DIR`)?"
        ) from e
    except json.JSONDecodeError as e:
        raise DataError(f"{str(path)!r} is not valid JSON ({e}); the run folder is damaged.") from e


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


def model_record(model, preprocess, *, strategy: str, temperature: float = 1.0) -> dict:
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


def save_model(run_dir: str | os.PathLike, model, preprocess, *, strategy: str) -> None:
    """Write model.safetensors and model.json into the run folder."""
    run_dir = Path(run_dir)
    save_weights(run_dir / WEIGHTS, model.state_dict(), {"format": MODEL_FORMAT})
    old = run_dir / MODEL_JSON
    temperature = read_json(old).get("temperature", 1.0) if old.exists() else 1.0
    write_json(
        run_dir / MODEL_JSON,
        model_record(model, preprocess, strategy=strategy, temperature=temperature),
    )
