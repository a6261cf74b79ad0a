"""What `auto` ranks its candidates by: held-out accuracy, or balanced accuracy (the mean recall
over the classes) where the run weights the classes (`--class-weights balanced`), so that a recipe
that neglects a rare class cannot win on the common ones."""

from __future__ import annotations

import numpy as np


def selection_metric(cfg) -> str:
    """The held-out number candidates are ranked by: "balanced_accuracy" or "accuracy"."""
    return "balanced_accuracy" if getattr(cfg, "class_weights", "none") == "balanced" else "accuracy"


def held_out_scores(cfg, results) -> dict:
    """A pilot's held-out numbers; `score` is the one it is ranked by (balanced accuracy falls back to
    accuracy for a run that has no confusion matrix)."""
    balanced = results.val_balanced_accuracy
    out = {
        "accuracy": results.val_accuracy,
        "balanced_accuracy": results.val_accuracy if balanced is None else balanced,
        "loss": results.val_loss,
    }
    return out | {"score": out[selection_metric(cfg)]}


def score_of(entry: dict) -> float | None:
    """The ranking score of one pilot's entry; None where the pilot failed."""
    return entry.get("score")


def rank_key(c, last: int | None = None) -> tuple[float, float] | None:
    """Rank key from the held-out scores so far (the `last` ones only, if given): higher mean
    score, then lower mean loss."""
    scores = [s for s in c.scores[-last if last else 0 :] if score_of(s) is not None]
    if not scores:
        return None
    return (-float(np.mean([score_of(s) for s in scores])), float(np.mean([s["loss"] for s in scores])))
