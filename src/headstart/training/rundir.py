"""The run folder while training: created (or refused), config.json, metrics.csv rows."""

from __future__ import annotations

import contextlib
import csv
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from headstart import __version__
from headstart.core.errors import ConfigError, DiskFull, RunInterrupted
from headstart.core.files import CHECKPOINT, CONFIG, RESULTS, RUN_FILES, STATUS, run_state, write_json

METRIC_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]


def prepare_output(output: str, *, overwrite: bool, resume: bool = False) -> Path:
    """Create the run folder, or refuse to mix a new run into a finished or unfinished one.

    --overwrite moves an existing run aside (RUN.replaced-TIME beside it) and starts in an empty
    folder; the old run is deleted only when the new one finishes, so a failed or interrupted
    overwrite never leaves a folder mixing two runs and loses nothing.
    """
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output {str(out)!r} is a file, not a folder. Choose another --output.")
    state = run_state(out).get("state") if out.is_dir() else None
    if resume:
        if state == "finished" and (out / RESULTS).exists():
            raise ConfigError(f"{str(out)!r} holds a finished run: there is nothing to resume.")
        if not (out / CONFIG).exists():
            raise ConfigError(f"{str(out)!r} is not a headstart run folder (no {CONFIG}); nothing to resume.")
        _check_writable(out)
        set_status(out, "running")
        return out
    if not overwrite and (out / CHECKPOINT).exists():
        raise ConfigError(
            f"{str(out)!r} holds an unfinished run (checkpoint.pt). Continue it with "
            f"`headstart train --resume {out}`, or pass --overwrite to start again."
        )
    if not overwrite and (out / RESULTS).exists():
        raise ConfigError(
            f"{str(out)!r} already holds a finished run. Pass --overwrite to replace it, or choose another "
            "--output."
        )
    aside = None
    if out.is_dir() and any(
        (out / f).exists() for f in RUN_FILES
    ):  # --overwrite, or a run that never started
        aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        os.replace(out, aside)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(
            f"--output {str(out)!r} cannot be created ({e.strerror or e}). Choose another --output."
        ) from e
    _check_writable(out)
    set_status(out, "running", replaces=str(aside) if aside else None)
    return out


@contextlib.contextmanager
def recorded(out: Path) -> Iterator[None]:
    """Mark the run stopped (resumable) or failed in status.json when training ends in an exception."""
    try:
        yield
    except BaseException as e:
        status = run_state(out) if (out / STATUS).exists() else {}
        if status.get("state") == "running" and status.get("pid") == os.getpid():  # this process's run
            resumable = (
                isinstance(e, RunInterrupted | DiskFull | KeyboardInterrupt) and (out / CHECKPOINT).exists()
            )
            set_status(out, "stopped" if resumable else "failed", detail=f"{type(e).__name__}: {e}"[:800])
        raise


def _check_writable(out: Path) -> None:
    """Fail now, not after an hour of training, when the run folder cannot be written."""
    probe = out / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"--output {str(out)!r} is not writable ({e.strerror or e}). Choose another --output, or fix its "
            "permissions."
        ) from e


def set_status(out: Path, state: str, *, detail: str = "", replaces: str | None = None) -> None:
    """status.json: running, stopped, failed or finished; every command that reads a run checks it."""
    old = run_state(out) if (out / STATUS).exists() else {}
    status = {
        "state": state,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "detail": detail,
        "pid": os.getpid(),
    }
    replaced = replaces or old.get("replaces")
    if replaced and state != "finished":
        status["replaces"] = replaced
    write_json(out / STATUS, status)
    if state == "finished" and replaced:  # the new run is complete: the one it replaced can go
        shutil.rmtree(replaced, ignore_errors=True)


def write_run_config(out: Path, options: dict, device: torch.device, **extra) -> None:
    """config.json: resolved options plus versions and machine, enough to reproduce the run."""
    import timm
    import torchvision

    write_json(
        out / CONFIG,
        {
            "options": options,
            "versions": {
                "headstart": __version__,
                "python": sys.version.split()[0],
                "torch": torch.__version__,
                "torchvision": torchvision.__version__,
                "timm": timm.__version__,
                "numpy": np.__version__,
            },
            "device": str(device),
            "platform": platform.platform(),
            "seed": options.get("seed"),
            **extra,
        },
    )


class MetricsLog:
    """metrics.csv, one row per epoch, flushed as it goes (rank 0 writes; other ranks write nothing)."""

    def __init__(self, path: Path, rows: list[dict], *, enabled: bool = True):
        self.rows = rows
        self._f = open(path if enabled else os.devnull, "w", newline="")  # noqa: SIM115 - closed in close()
        self._w = csv.DictWriter(self._f, METRIC_COLUMNS)
        self._w.writeheader()
        self._w.writerows(rows)  # a resumed run rewrites the rows it already had

    def add(self, row: dict) -> None:
        """Append one epoch's row."""
        self._w.writerow(row)
        self._f.flush()
        self.rows.append(row)

    def close(self) -> None:
        """Close the file."""
        self._f.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
