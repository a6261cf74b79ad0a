"""Metrics on labels, probabilities and logits: one implementation of each, scikit-learn where it
has the function. Evaluation, calibration, the report, training and export all use these."""

from __future__ import annotations

import math

import numpy as np
import torch

N_BINS = 15
# Bounds on log T: T in [0.05, 20] covers every sane case; hitting a bound is reported.
LOG_T_BOUNDS = (math.log(0.05), math.log(20.0))


def probabilities(logits: torch.Tensor, head_kind: str, temperature: float = 1.0) -> torch.Tensor:
    """softmax(z / T) [B, C], or [1-p, p] for the single-logit binary head.

    float64 input stays float64 (the temperature fit needs it); anything else is computed in float32.
    """
    z = logits if logits.dtype == torch.float64 else logits.float()
    z = z / temperature
    if head_kind == "binary":
        p = torch.sigmoid(z.reshape(-1))
        return torch.stack([1 - p, p], dim=1)
    return torch.softmax(z, dim=1)


def probabilities_np(logits: np.ndarray, head_kind: str, temperature: float = 1.0) -> np.ndarray:
    """`probabilities` for a NumPy array, in float64."""
    z = torch.from_numpy(np.asarray(logits, dtype=np.float64))
    return probabilities(z, head_kind, temperature).numpy()


def nll(probs: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes."""
    p = probs[np.arange(len(y)), np.asarray(y, dtype=np.int64)]
    return float(-np.log(np.clip(p, 1e-12, 1.0)).mean()) if len(y) else 0.0


def reliability_bins(probs: np.ndarray, y: np.ndarray, *, n_bins: int = N_BINS) -> list[dict]:
    """Per equal-width confidence bin (lo, hi]: count, mean confidence, accuracy."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(y)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    out = []
    for b in range(n_bins):
        m = which == b
        n = int(m.sum())
        out.append(
            {
                "lo": float(edges[b]),
                "hi": float(edges[b + 1]),
                "count": n,
                "confidence": float(conf[m].mean()) if n else None,
                "accuracy": float(correct[m].mean()) if n else None,
            }
        )
    return out


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, *, n_bins: int = N_BINS) -> float:
    """ECE with `n_bins` equal-width bins: sum over bins of |accuracy - confidence| x share."""
    total = len(y)
    if total == 0:
        return 0.0
    bins = [b for b in reliability_bins(probs, y, n_bins=n_bins) if b["count"]]
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins))


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, log loss, per-class P/R/F1, macro F1, ECE and the confusion matrix."""
    from sklearn.metrics import confusion_matrix, log_loss, precision_recall_fscore_support

    y_true = np.asarray(y_true, dtype=np.int64)
    labels = list(range(len(classes)))
    y_pred = probs.argmax(axis=1)
    p, r, f1, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    clipped = np.clip(probs, 1e-7, 1.0)
    n = len(y_true)
    return {
        "num_images": int(n),
        "accuracy": float((y_pred == y_true).mean()) if n else 0.0,
        "loss": float(log_loss(y_true, clipped / clipped.sum(1, keepdims=True), labels=labels)) if n else 0.0,
        "per_class": {
            c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f1[i]), "support": int(s[i])}
            for i, c in enumerate(classes)
        },
        "macro_f1": float(np.mean(f1)),
        "ece": expected_calibration_error(probs, y_true),
        "confusion_matrix": {
            "classes": list(classes),
            "rows_true_cols_pred": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        },
    }


def fit_temperature(logits: np.ndarray, y: np.ndarray, head_kind: str) -> float:
    """The T > 0 minimising NLL of softmax(z / T) (bounded scalar search on log T)."""
    from scipy.optimize import minimize_scalar

    from headstart.core.errors import DataError

    if len(y) == 0:
        raise DataError("Cannot fit a temperature on zero images.")
    res = minimize_scalar(
        lambda log_t: nll(probabilities_np(logits, head_kind, math.exp(log_t)), y),
        bounds=LOG_T_BOUNDS,
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(math.exp(res.x))


def calibration_summary(
    logits: np.ndarray, y: np.ndarray, head_kind: str, temperature: float, *, n_bins: int = N_BINS
) -> dict:
    """ECE and NLL at T=1 (before) and at `temperature` (after), plus the reliability bins."""
    before = probabilities_np(logits, head_kind, 1.0)
    after = probabilities_np(logits, head_kind, temperature)
    return {
        "temperature": temperature,
        "ece_before": expected_calibration_error(before, y, n_bins=n_bins),
        "ece_after": expected_calibration_error(after, y, n_bins=n_bins),
        "nll_before": nll(before, y),
        "nll_after": nll(after, y),
        "accuracy": float((after.argmax(1) == y).mean()) if len(y) else 0.0,
        "bins": n_bins,
        "num_images": int(len(y)),
        # e.g. a perfectly separated validation set drives T to the lower bound
        "at_bound": bool(min(abs(math.log(temperature) - b) for b in LOG_T_BOUNDS) < 1e-2),
        "reliability_before": reliability_bins(before, y, n_bins=n_bins),
        "reliability_after": reliability_bins(after, y, n_bins=n_bins),
    }


def balanced_class_weights(counts: list[int]) -> np.ndarray:
    """scikit-learn's 'balanced' weights n / (k * count_c) for per-class counts (empty classes: 0)."""
    from sklearn.utils.class_weight import compute_class_weight

    counts = np.asarray(counts, dtype=np.int64)
    present = np.flatnonzero(counts)
    y = np.repeat(np.arange(len(counts)), counts)
    w = np.zeros(len(counts), dtype=np.float64)
    if len(present):
        w[present] = compute_class_weight("balanced", classes=present, y=y)
    return w


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> np.ndarray:
    """[k, k] int64 counts, rows true class, columns predicted (summable across batches and ranks)."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    return np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)


def balanced_accuracy(confusion: list[list[int]]) -> float:
    """Mean recall over the classes present (rows: true, columns: predicted), as scikit-learn's."""
    cm = np.asarray(confusion, dtype=np.float64)
    support = cm.sum(axis=1)
    present = support > 0
    return float((np.diag(cm)[present] / support[present]).mean()) if present.any() else 0.0


def unlearnt_classes(confusion: list[list[int]], classes: list[str]) -> str | None:
    """A warning when some classes present in the data are never recognised (recall 0) and the
    errors fall on the small classes (balanced accuracy 0.1 or more below accuracy), e.g. a model
    that answers the largest class for everything; None otherwise (a few missed classes of one
    image each, on balanced data, are noise, not this)."""
    cm = np.asarray(confusion, dtype=np.int64)
    support, answers, total = cm.sum(axis=1), cm.sum(axis=0), max(int(cm.sum()), 1)
    missed = [i for i in range(len(classes)) if support[i] and cm[i, i] == 0]
    balanced = balanced_accuracy(confusion)
    if not missed or (support > 0).sum() < 2 or np.trace(cm) / total - balanced < 0.1:
        return None
    names = ", ".join(f"{classes[i]!r} 0 of {support[i]}" for i in missed[:5])
    more = f" and {len(missed) - 5} more" if len(missed) > 5 else ""
    top = int(answers.argmax())
    return (
        f"warning: {len(missed)} of {int((support > 0).sum())} classes are never recognised on the "
        f"validation images ({names}{more}); {answers[top] / total:.0%} of the answers are "
        f"{classes[top]!r}, and the balanced accuracy is {balanced:.4f}. Accuracy alone hides this when "
        "classes are imbalanced: try --class-weights balanced, add images of those classes, or run "
        "`headstart doctor DATA`."
    )
