"""Atomic file writes and JSON with errors that name the file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from headstart.core.errors import DataError

# The run folder: what each file is called (docs/run-folder.md describes them).
CONFIG, METRICS, RESULTS, SPLIT = "config.json", "metrics.csv", "results.json", "split.json"
WEIGHTS, MODEL_JSON, CHECKPOINT = "model.safetensors", "model.json", "checkpoint.pt"
EVALUATION = "evaluation.json"


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
        Path(tmp).unlink(missing_ok=True)
        raise


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
