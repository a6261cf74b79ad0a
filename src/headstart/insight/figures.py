"""The figures of evaluation and the report (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(metrics: list[dict], path: Path) -> None:
    """Loss and accuracy per epoch, train vs validation."""
    plt = _plt()
    ep = [m["epoch"] for m in metrics]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    for ax, key, title in ((axes[0], "loss", "loss"), (axes[1], "acc", "accuracy")):
        ax.plot(ep, [m[f"train_{key}"] for m in metrics], "o-", ms=3, label="train", color="#4c78a8")
        ax.plot(ep, [m[f"val_{key}"] for m in metrics], "o-", ms=3, label="validation", color="#f58518")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    axes[1].set_ylim(min(0.5, axes[1].get_ylim()[0]), 1.02)
    axes[0].legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_confusions(cm: np.ndarray, classes: list[str], path: Path) -> None:
    """Counts and row-normalised (recall per true class) side by side."""
    plt = _plt()
    n = len(classes)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    side = min(7.0, max(3.6, 0.45 * n + 2.2))
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 0.6, side), dpi=100)
    for ax, mat, title, fmt in ((axes[0], cm, "counts", "{:d}"), (axes[1], norm, "row-normalised", "{:.2f}")):
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        ticks = range(n)
        ax.set_xticks(ticks, classes, rotation=45 if n > 3 else 0, ha="right" if n > 3 else "center")
        ax.set_yticks(ticks, classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
        if n <= 20:
            for i in range(n):
                for j in range(n):
                    v = int(mat[i, j]) if fmt == "{:d}" else float(mat[i, j])
                    ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=9,
                            color="white" if norm[i, j] > 0.5 else "black")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_per_class(per_class: dict, path: Path) -> None:
    """Grouped bars of precision, recall and F1 per class."""
    plt = _plt()
    names = list(per_class)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(names) + 3), 3.4), dpi=100)
    for k, (key, color) in enumerate((("precision", "#4c78a8"), ("recall", "#f58518"), ("f1", "#54a24b"))):
        ax.bar(x + (k - 1) * 0.26, [per_class[c][key] for c in names], 0.26, label=key, color=color)
    ax.set_xticks(x, names, rotation=45 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center")
    ax.set_ylim(0, 1.05)
    ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_title("per-class precision, recall, F1")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_reliability(cal: dict, path: Path) -> None:
    """Reliability diagram: accuracy vs confidence per bin, before and after temperature scaling."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), dpi=100, sharey=True)
    for ax, key, title, ece in (
        (axes[0], "reliability_before", "before (T = 1)", cal["ece_before"]),
        (axes[1], "reliability_after", f"after (T = {cal['temperature']:.3f})", cal["ece_after"]),
    ):
        bins = [b for b in cal[key] if b["count"]]
        width = bins[0]["hi"] - bins[0]["lo"] if bins else 1 / 15
        ax.bar([b["lo"] for b in bins], [b["accuracy"] for b in bins], width=width, align="edge",
               color="#4c78a8", edgecolor="white", label="accuracy")  # fmt: skip
        ax.plot([0, 1], [0, 1], "--", color="#888888", lw=1, label="perfect calibration")
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="#f58518",
                ms=4, label="bin mean confidence")  # fmt: skip
        ax.set_title(f"{title}   ECE {ece:.4f}")
        ax.set_xlabel("confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.spines[["top", "right"]].set_visible(False)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(frameon=False, loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_confusion(cm: list[list[int]], classes: list[str], path: str | Path) -> None:
    """Confusion matrix PNG with counts (rows: true class, columns: predicted)."""
    plt = _plt()
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


def plot_ood_scores(scores: np.ndarray, threshold: float, path: Path) -> None:
    """Histogram of the OOD scores of the report's images, with the rejection threshold."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=100)
    ax.hist(scores, bins=40, color="#4c78a8", alpha=0.85)
    ax.axvline(threshold, color="#e45756", lw=2, label=f"threshold {threshold:.1f}: above is unknown")
    ax.set_xlabel("squared Mahalanobis distance to the closest class")
    ax.set_ylabel("images")
    ax.legend(frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
