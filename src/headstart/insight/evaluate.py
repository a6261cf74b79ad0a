"""Evaluation: loss, accuracy, per-class precision/recall/F1, ECE and the confusion matrix (+ PNG)."""

from __future__ import annotations

import os
from pathlib import Path

from headstart.core.files import EVALUATION, RESULTS, write_json
from headstart.core.metrics import classification_metrics
from headstart.inference.logits import Logits, run_logits
from headstart.insight.figures import plot_confusion
from headstart.training.record import RunResults


def evaluation_of(lg: Logits, temperature: float, run_dir: str | os.PathLike | None = None) -> dict:
    """evaluation.json content from one pass of logits at `temperature`."""
    result = classification_metrics(lg.y, lg.probs(temperature), lg.classes)
    result["data"] = lg.data
    result["skipped_files"] = list(lg.skipped)
    result["temperature"] = temperature
    if run_dir is not None and (Path(run_dir) / RESULTS).exists():
        calibration = RunResults.read(run_dir).calibration
        if calibration is not None:
            result["calibration"] = calibration
    return result


def write_evaluation(run_dir: str | os.PathLike, result: dict) -> None:
    """evaluation.json and confusion_matrix.png in the run folder."""
    run_dir = Path(run_dir)
    write_json(run_dir / EVALUATION, result)
    cm = result["confusion_matrix"]
    plot_confusion(cm["rows_true_cols_pred"], cm["classes"], run_dir / "confusion_matrix.png")


def evaluate(
    run_dir: str | os.PathLike,
    *,
    data: str | None = None,
    device: str = "auto",
    batch_size: int = 64,
    num_workers: int | None = None,
    write: bool = True,
) -> dict:
    """Evaluate a run on its validation split (or `data`); writes evaluation.json and a PNG."""
    predictor, lg = run_logits(
        run_dir, data=data, device=device, batch_size=batch_size, num_workers=num_workers
    )
    result = evaluation_of(lg, predictor.temperature, run_dir)
    if write:
        write_evaluation(run_dir, result)
    return result
