"""`headstart compare`: train several strategies (and backbones) on one split, one seed, one table.

The tutorials' "from scratch vs feature extraction vs fine-tuning" experiment as one call. Every
run keeps its own folder under the output; the table goes to compare.md, compare.csv and
compare.png.
"""

from __future__ import annotations

import csv
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from headstart.core.errors import ConfigError, HeadstartError
from headstart.core.files import SPLIT, atomic_write_bytes, csv_cell, read_json
from headstart.data.layout import resolve_data
from headstart.models.config import DEFAULT_BACKBONE
from headstart.training.options import TrainConfig
from headstart.training.run import train
from headstart.training.strategies import public_names

DEFAULT_STRATEGIES = ("scratch", "linear-probe", "extract", "finetune")
# Epochs for strategies that train the backbone on images (each epoch is a full forward and
# backward pass, minutes on a CPU). Strategies on cached features keep their own defaults:
# their epochs cost milliseconds once the single feature pass is done.
DEFAULT_COMPARE_EPOCHS = 2
IMAGE_STRATEGIES = ("scratch", "finetune", "full")
COLUMNS = [
    "backbone",
    "strategy",
    "status",
    "val_accuracy",
    "val_loss",
    "trainable_params",
    "epochs",
    "wall_seconds",
    "images_per_second",
    "run",
]


@dataclass
class CompareResult:
    """The rows of the table and the files written."""

    rows: list[dict]
    output: Path
    markdown: str

    @property
    def markdown_path(self) -> Path:
        """compare.md"""
        return self.output / "compare.md"

    @property
    def csv_path(self) -> Path:
        """compare.csv"""
        return self.output / "compare.csv"

    @property
    def plot_path(self) -> Path:
        """compare.png"""
        return self.output / "compare.png"


def compare(
    data: str | os.PathLike,
    *,
    strategies: list[str] | tuple[str, ...] = DEFAULT_STRATEGIES,
    backbones: list[str] | tuple[str, ...] = (DEFAULT_BACKBONE,),
    output: str | os.PathLike | None = None,
    epochs: int | None = None,
    seed: int = 0,
    val: str | None = None,
    **train_options: Any,
) -> CompareResult:
    """Train each backbone x strategy on the same split and seed; write md/csv/png tables.

    `train_options` are any other TrainConfig options, passed to every run.
    """
    strategies, backbones = list(strategies), list(backbones)
    bad = [s for s in strategies if s not in public_names()]
    if bad or not strategies:
        raise ConfigError(f"--strategies {','.join(strategies)!r}: use some of {', '.join(public_names())}.")
    if not backbones:
        raise ConfigError("--backbones is empty: name at least one backbone.")
    if epochs is not None and epochs < 1:
        raise ConfigError(f"--epochs has an invalid value: {epochs}.")
    # fail once, early, on a bad option or a data problem
    TrainConfig(data=str(data)).with_overrides(dict(train_options, seed=seed, val=val)).resolved()
    resolve_data(data, val=val, seed=seed)
    name = os.path.basename(os.path.normpath(str(data)))
    out = Path(output or os.path.join("runs", f"compare-{name}"))
    out.mkdir(parents=True, exist_ok=True)
    rows = [
        _one_run(data, out, backbone, strategy, epochs, dict(train_options, seed=seed, val=val))
        for backbone in backbones
        for strategy in strategies
    ]
    _check_same_split([Path(r["run"]) for r in rows if r["status"] == "ok"])
    md = to_markdown(rows)
    atomic_write_bytes(out / "compare.md", md.encode())
    atomic_write_bytes(out / "compare.csv", to_csv(rows).encode())
    plot_compare(rows, out / "compare.png")
    return CompareResult(rows, out, md)


def _one_run(data, out: Path, backbone: str, strategy: str, epochs: int | None, options: dict) -> dict:
    """Train one backbone x strategy; its table row (a failure is a row too, not an exception)."""
    run_dir = out / f"{_slug(backbone)}-{strategy}"
    row = {c: "" for c in COLUMNS} | {"backbone": backbone, "strategy": strategy, "run": str(run_dir)}
    opts = dict(options, backbone=backbone, strategy=strategy, overwrite=True)
    if strategy in IMAGE_STRATEGIES:
        opts["epochs"] = epochs or DEFAULT_COMPARE_EPOCHS
    t0 = time.perf_counter()
    try:
        r = train(str(data), output=str(run_dir), **opts).results
    except HeadstartError as e:
        return row | {"status": f"failed ({type(e).__name__}: {e})"}
    wall = time.perf_counter() - t0
    epochs_run = int(r.epochs_run or 1)
    trained = float(r.epochs_trained or epochs_run)  # a part epoch the budget cut counts as its share
    return row | dict(
        status="ok",
        val_accuracy=round(float(r.val_accuracy), 4),
        val_loss=round(float(r.val_loss), 4),
        trainable_params=int(r.trainable_params),
        epochs=epochs_run,
        wall_seconds=round(wall, 1),
        # training throughput: images passed through the trained part per wall second
        images_per_second=round(int(r.num_train) * trained / max(wall, 1e-9), 1),
    )


def _slug(backbone: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in backbone)


def _check_same_split(run_dirs: list[Path]) -> None:
    """Every run must have seen the same train/val files, or the table compares nothing."""
    splits = [read_json(d / SPLIT) for d in run_dirs if (d / SPLIT).exists()]
    keys = {(str(s.get("train")), str(s.get("val"))) for s in splits}
    if len(keys) > 1:
        raise HeadstartError(f"The runs in {[str(d) for d in run_dirs]} used different splits.")


def to_markdown(rows: list[dict]) -> str:
    """A GitHub Markdown table of the rows."""
    heads = [
        "backbone",
        "strategy",
        "val acc",
        "val loss",
        "trainable params",
        "epochs",
        "wall s",
        "images/s",
        "status",
    ]
    keys = [
        "backbone",
        "strategy",
        "val_accuracy",
        "val_loss",
        "trainable_params",
        "epochs",
        "wall_seconds",
        "images_per_second",
        "status",
    ]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:
        cells = []
        for k in keys:
            v = r[k]
            if k == "trainable_params" and v != "":
                v = f"{v:,}"
            elif k in ("val_accuracy", "val_loss") and v != "":
                v = f"{v:.4f}"
            cells.append(str(v).replace("|", "/"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    """CSV text with COLUMNS."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, COLUMNS)
    w.writeheader()
    w.writerows([{k: csv_cell(v) if isinstance(v, str) else v for k, v in r.items()} for r in rows])
    return buf.getvalue()


def plot_compare(rows: list[dict], path: str | os.PathLike) -> None:
    """Bar plot: validation accuracy and wall time per run (unavailable runs shown empty)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    multi = len({r["backbone"] for r in rows}) > 1
    labels = [f"{r['backbone']}\n{r['strategy']}" if multi else r["strategy"] for r in rows]
    acc = [r["val_accuracy"] if r["status"] == "ok" else 0.0 for r in rows]
    wall = [r["wall_seconds"] if r["status"] == "ok" else 0.0 for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(rows) * 2), 4), dpi=100)
    for ax, vals, title, fmt in (
        (axes[0], acc, "validation accuracy", "{:.3f}"),
        (axes[1], wall, "wall time (s)", "{:.0f}"),
    ):
        bars = ax.bar(
            range(len(rows)), vals, color=["#4c78a8" if r["status"] == "ok" else "#cccccc" for r in rows]
        )
        ax.set_xticks(range(len(rows)), labels, fontsize=9)
        ax.set_title(title)
        for b, v, r in zip(bars, vals, rows, strict=True):
            text = fmt.format(v) if r["status"] == "ok" else "n/a"
            ax.annotate(
                text, (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=9
            )
        ax.spines[["top", "right"]].set_visible(False)
    axes[0].set_ylim(0, 1.08)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
