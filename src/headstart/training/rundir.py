"""The run folder while training: created (or refused), config.json, metrics.csv rows."""

from __future__ import annotations

import csv
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from headstart import __version__
from headstart.core.errors import ConfigError
from headstart.core.files import CHECKPOINT, CONFIG, RESULTS, write_json

METRIC_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]


def prepare_output(output: str, *, overwrite: bool, resume: bool = False) -> Path:
    """Create the run folder; refuse to mix a new run into a finished or unfinished one unless asked."""
    out = Path(output)
    if resume:
        if (out / RESULTS).exists():
            raise ConfigError(f"{str(out)!r} holds a finished run: there is nothing to resume.")
        if not (out / CONFIG).exists():
            raise ConfigError(f"{str(out)!r} is not a headstart run folder (no {CONFIG}); nothing to resume.")
        return out
    if (out / RESULTS).exists() and not overwrite:
        raise ConfigError(
            f"{str(out)!r} already holds a finished run. Pass --overwrite to replace it, or "
            "choose another --output."
        )
    if (out / CHECKPOINT).exists():
        if not overwrite:
            raise ConfigError(
                f"{str(out)!r} holds an unfinished run (checkpoint.pt). Continue it with "
                f"`headstart train --resume {out}`, or pass --overwrite to start again."
            )
        (out / CHECKPOINT).unlink()  # a stale checkpoint must never be resumed into a new run
    out.mkdir(parents=True, exist_ok=True)
    return out


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
