"""Prediction over large folders into a CSV: streamed, resumable, every file accounted for."""

from __future__ import annotations

import csv
import io
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from headstart.core.errors import ConfigError
from headstart.core.files import csv_cell
from headstart.data.layout import image_paths
from headstart.inference.predictor import Prediction, Predictor


@dataclass
class BatchSummary:
    """What one `predict --csv` call did."""

    csv: Path
    rows_written: int
    already_done: int
    errors: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        """Throughput over the rows written by this call (decode + model + CSV)."""
        return self.rows_written / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        """One line for the CLI."""
        done = f", skipped {self.already_done} already in the CSV" if self.already_done else ""
        errs = f", {self.errors} unreadable (error rows)" if self.errors else ""
        return (
            f"wrote {self.rows_written} rows to {self.csv} in {self.seconds:.1f}s "
            f"({self.images_per_second:.1f} img/s){done}{errs}"
        )


def done_paths(path: str | os.PathLike, top_k: Columns | int) -> set[str]:
    """Paths already in a prediction CSV; drops a half-written last line left by a killed run."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return set()
    with open(path, "rb+") as f:
        data = f.read()
        # rows end in \r\n (csv's terminator); a bare \n may sit inside a quoted file name
        if not data.endswith(b"\r\n"):
            cut = data.rfind(b"\r\n") + 2 if b"\r\n" in data else 0  # 0: even the header is incomplete
            f.truncate(cut)
            data = data[:cut]
    rows = list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
    if not rows:
        return set()
    columns = Columns(top_k) if isinstance(top_k, int) else top_k
    want = columns.header()
    if rows[0] != want:
        raise ConfigError(
            f"Cannot --resume into {str(path)!r}: its columns are {','.join(rows[0])} but --top-k "
            f"{columns.top_k}{' --sets' * columns.sets}{' --reject' * columns.reject} writes "
            f"{','.join(want)}. Resume with the same options, or write a new --csv."
        )
    return {r[0] for r in rows[1:] if r}  # as written: csv_cell(path)


def predict_to_csv(
    predictor: Predictor,
    inputs: Iterable,
    csv_path: str | os.PathLike,
    *,
    top_k: int = 1,
    batch_size: int = 32,
    num_workers: int | None = None,
    resume: bool = False,
    progress: bool = True,
    sets: bool = False,
    reject: bool = False,
) -> BatchSummary:
    """Predict every image under `inputs` into `csv_path`, row by row; `resume` skips rows present.

    sets adds a `set` column (labels joined by "|"); reject labels strangers "unknown" and adds the
    `ood_score` column.
    """
    csv_path = Path(csv_path)
    paths = image_paths(inputs)
    predictor.require(sets=sets, reject=reject)
    _check_writable(csv_path)
    columns = Columns(top_k, sets, reject)
    done = done_paths(csv_path, columns) if resume else set()
    todo = [p for p in paths if csv_cell(p) not in done]
    append = resume and csv_path.exists() and csv_path.stat().st_size > 0
    errors = 0

    def counted(preds: Iterable[Prediction]):
        nonlocal errors
        for p in preds:
            errors += p.error is not None
            yield p

    t0 = time.perf_counter()
    preds = predictor.predict_paths(todo, top_k=top_k, batch_size=batch_size, num_workers=num_workers,
                                    progress=progress, reject=reject)  # fmt: skip
    if todo or not append:
        n = write_csv(counted(preds), csv_path, columns, append=append)
    else:
        n = 0
    return BatchSummary(csv_path, n, len(paths) - len(todo), errors, time.perf_counter() - t0)


def _check_writable(path: Path) -> None:
    """The CSV's folder exists (it is created) and the file can be written: checked before predicting."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a"):
            pass
    except OSError as e:
        raise ConfigError(
            f"--csv {str(path)!r} cannot be written ({e.strerror or e}). Choose another path."
        ) from e


@dataclass(frozen=True)
class Columns:
    """What a prediction CSV holds: top-k labels, and optionally the set and the OOD score."""

    top_k: int = 1
    sets: bool = False
    reject: bool = False

    def header(self) -> list[str]:
        """path,label,probability,label_2,probability_2,…[,set][,ood_score],error."""
        extra = [c for j in range(2, self.top_k + 1) for c in (f"label_{j}", f"probability_{j}")]
        optional = ["set"] * self.sets + ["ood_score"] * self.reject
        return ["path", "label", "probability", *extra, *optional, "error"]

    def row(self, p: Prediction) -> list[str]:
        """One image's cells; with reject, a stranger's label is "unknown" (label_2… keep the ranking)."""
        cells = []
        for j in range(self.top_k):
            has = j < len(p.labels)
            label = p.label if j == 0 else (p.labels[j] if has else "")
            cells += [csv_cell(label) if has else "", f"{p.probabilities[j]:.6f}" if has else ""]
        if self.sets:
            cells.append(csv_cell("|".join(p.set or [])))
        if self.reject:
            cells.append("" if p.ood_score is None else f"{p.ood_score:.4f}")
        return [csv_cell(p.path), *cells, csv_cell(p.error or "")]


def csv_header(top_k: int) -> list[str]:
    """Columns of the plain prediction CSV: path,label,probability,label_2,probability_2,…,error."""
    return Columns(top_k).header()


def write_csv(
    predictions: Iterable[Prediction],
    path: str | os.PathLike,
    columns: Columns | int,
    *,
    append: bool = False,
) -> int:
    """Rows `path,label,probability` (top-1), then label_2,probability_2…, optional columns and error.

    `append` adds rows to an existing file without writing the header again (for --resume).
    """
    columns = Columns(columns) if isinstance(columns, int) else columns
    n = 0
    with open(path, "a" if append else "w", newline="") as f:
        w = csv.writer(f)
        if not append:
            w.writerow(columns.header())
        for p in predictions:
            w.writerow(columns.row(p))
            n += 1
            f.flush()
    return n
