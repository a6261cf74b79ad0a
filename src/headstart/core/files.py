"""Atomic file writes and JSON with errors that name the file."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

from headstart.core.errors import DataError, DiskFull

# The run folder: what each file is called (docs/run-folder.md describes them).
CONFIG, METRICS, RESULTS, SPLIT = "config.json", "metrics.csv", "results.json", "split.json"
WEIGHTS, MODEL_JSON, CHECKPOINT = "model.safetensors", "model.json", "checkpoint.pt"
EVALUATION, STATUS, PLAN = "evaluation.json", "status.json", "plan.json"
RUN_FILES = (CONFIG, RESULTS, CHECKPOINT, STATUS, WEIGHTS, MODEL_JSON)  # any of them: a headstart run folder


def run_state(run_dir: str | os.PathLike) -> dict:
    """status.json of a run folder: {"state": running|stopped|failed|finished, ...}; runs from before
    status files existed count as finished when they have results.json."""
    run_dir = Path(run_dir)
    path = run_dir / STATUS
    if not path.exists():
        return {
            "state": "finished" if (run_dir / RESULTS).exists() or not (run_dir / CONFIG).exists() else "?"
        }
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"state": "damaged"}
    return status if isinstance(status, dict) else {"state": "damaged"}


def require_finished(run_dir: str | os.PathLike) -> None:
    """DataError unless the run folder holds a finished run (predict, evaluate, report, export)."""
    status = run_state(run_dir)
    if status.get("state") != "finished":
        detail = f": {status['detail']}" if status.get("detail") else ""
        raise DataError(
            f"{str(run_dir)!r} does not hold a finished run (status.json says {status.get('state')!r}"
            f"{detail}). Finish it with `headstart train --resume {run_dir}`, or train it again with "
            "--overwrite."
        )


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write via a temp file in the same folder, fsync, then rename: never a half-written file.

    A full disk is a DiskFull naming the file (the previous version of the file, if any, is kept).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        if e.errno in FULL:
            raise no_space(path, len(data), e) from e
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # umask-respecting permissions, like every other file headstart writes (mkstemp makes 0600)
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in FULL:
            raise no_space(path, len(data), e) from e
        raise


FULL = (errno.ENOSPC, errno.EDQUOT)


def csv_cell(text: str) -> str:
    """Text a spreadsheet would run as a formula (=, +, -, @, tab, CR first) gets a leading quote
    (OWASP's advice for CSV injection); every CSV headstart writes passes text through this."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def no_space(path: Path, size: int, error: OSError) -> DiskFull:
    """A full disk while writing `path`: which file, how much, what is left."""
    try:
        free = shutil.disk_usage(path.parent if path.parent.exists() else ".").free
    except OSError:
        free = 0
    return DiskFull(
        f"No space left on the disk of {str(path)!r}: writing {size / 1e6:.1f} MB failed with "
        f"{free / 1e6:.1f} MB free ({error.strerror}). The previous version of the file, if any, is "
        "unchanged."
    )


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; set back at once, while importing
    os.umask(mask)
    return mask


UMASK = _read_umask()


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
