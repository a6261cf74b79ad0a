"""Evaluation: loss, accuracy, per-class precision/recall/F1, confusion matrix (+ PNG)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from headstart.data import resolve_data, scan_class_tree
from headstart.errors import DataError
from headstart.runs import RESULTS, SPLIT, read_json, write_json


def compute_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """Metrics from true labels [N] and probabilities [N, C] (scikit-learn does the counting)."""
    from sklearn.metrics import confusion_matrix, log_loss, precision_recall_fscore_support

    from headstart.calibrate import expected_calibration_error

    y_true = np.asarray(y_true, dtype=np.int64)
    labels = list(range(len(classes)))
    y_pred = probs.argmax(axis=1)
    p, r, f1, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    clipped = np.clip(probs, 1e-7, 1.0)
    return {
        "num_images": int(len(y_true)),
        "accuracy": float((y_pred == y_true).mean()) if len(y_true) else 0.0,
        "loss": float(log_loss(y_true, clipped / clipped.sum(1, keepdims=True), labels=labels))
        if len(y_true)
        else 0.0,
        "per_class": {
            c: {
                "precision": float(p[i]),
                "recall": float(r[i]),
                "f1": float(f1[i]),
                "support": int(s[i]),
            }
            for i, c in enumerate(classes)
        },
        "macro_f1": float(np.mean(f1)),
        "ece": expected_calibration_error(probs, y_true),
        "confusion_matrix": {
            "classes": list(classes),
            "rows_true_cols_pred": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        },
    }


def plot_confusion(cm: list[list[int]], classes: list[str], path: str | os.PathLike) -> None:
    """Confusion matrix PNG with counts (rows: true class, columns: predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    n = len(classes)
    size = max(4.0, 0.6 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    hi = cm.max() if cm.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > hi / 2 else "black")  # fmt: skip
    ax.set_title("Confusion matrix")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def evaluation_items(run_dir: Path, classes: list[str], data: str | None) -> list[tuple[str, int]]:
    """The images to evaluate: the run's own validation split, or a class tree / train-val folder."""
    if data is None:
        split_file = run_dir / SPLIT
        if not split_file.exists():
            raise DataError(f"{str(split_file)!r} is missing; pass --data DIR to evaluate on.")
        return [(p, int(y)) for p, y in read_json(split_file)["val"]]
    root = Path(data)
    has_split = (root / "train").is_dir() and any(
        (root / n).is_dir() for n in ("val", "valid", "validation", "test")
    )
    if has_split:
        split = resolve_data(root)
        names, items = split.classes, split.val
    else:
        names, items, _ = scan_class_tree(root)
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise DataError(
            f"{str(root)!r} has classes the model was not trained on: {unknown}. The model knows {classes}."
        )
    return [(p, classes.index(names[y])) for p, y in items]


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
    from headstart.predict import load

    run_dir = Path(run_dir)
    predictor = load(run_dir, device=device)
    items = evaluation_items(run_dir, predictor.classes, data)
    preds = predictor.predict(
        [p for p, _ in items], top_k=len(predictor.classes), batch_size=batch_size,
        num_workers=num_workers, progress=True,
    )  # fmt: skip
    idx = {c: i for i, c in enumerate(predictor.classes)}
    good = [(pr, y) for pr, (_, y) in zip(preds, items, strict=True) if pr.error is None]
    probs = np.zeros((len(good), len(idx)), dtype=np.float64)
    for row, (pr, _) in enumerate(good):
        for lab, p in zip(pr.labels, pr.probabilities, strict=True):
            probs[row, idx[lab]] = p
    y = np.array([y for _, y in good], dtype=np.int64)
    result = compute_metrics(y, probs, predictor.classes)
    result["data"] = data or "validation split of the run"
    result["skipped_files"] = [{"path": p.path, "reason": p.error} for p in preds if p.error]
    result["temperature"] = predictor.temperature
    if (run_dir / RESULTS).exists() and "calibration" in read_json(run_dir / RESULTS):
        result["calibration"] = read_json(run_dir / RESULTS)["calibration"]
    if write:
        write_json(run_dir / "evaluation.json", result)
        plot_confusion(
            result["confusion_matrix"]["rows_true_cols_pred"],
            predictor.classes,
            run_dir / "confusion_matrix.png",
        )
    return result
