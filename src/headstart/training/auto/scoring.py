"""What `auto` ranks its candidates by: held-out accuracy, or balanced accuracy (the mean recall
over the classes) where the run weights the classes (`--class-weights balanced`), so that a recipe
that neglects a rare class cannot win on the common ones; and which go on, or win, where scores
are within noise of each other."""

from __future__ import annotations

import numpy as np

from headstart.core import logs
from headstart.training.auto.candidates import LARGER, Candidate


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


def standard_error(accuracy: float, held_out: int) -> float:
    """One standard error of an accuracy measured on `held_out` images (binomial)."""
    return float(np.sqrt(max(0.0, accuracy * (1 - accuracy)) / max(1, held_out)))


def survivors(ranked: list[Candidate], held_out: int) -> list[Candidate]:
    """The pilots that go on: the best third (two at least), and those within one standard error
    (on `held_out` images) of the last of them, up to half of all. On 5,000 CIFAR-10 images, 10m,
    pilots on 530 scored 1 group on cached maps 0.7185 and 2 groups 0.7148, 2.8 points of noise
    apart: 1 group went on, 2 did not, and 1 group's final run scored 0.804 where 2 groups' had
    scored 0.845-0.849."""
    keep = max(2, len(ranked) // 3)
    if len(ranked) <= keep:
        return ranked
    last = score_of(ranked[keep - 1].scores[-1]) or 0.0
    noise = standard_error(last, held_out)
    close = [c for c in ranked[keep:] if (score_of(c.scores[-1]) or 0.0) >= last - noise]
    return ranked[:keep] + close[: max(0, len(ranked) // 2 - keep)]


def larger_within_noise(ranked: list[Candidate], held_out: int, only: int | None, record: dict) -> Candidate:
    """The last stage's winner: of the recipes of the best one's kind that score within one standard
    error of it (on `held_out` images), the one of the largest embedded backbone (the best ranked of
    those). The final run sees many more images than the stage did, and larger ImageNet models
    transfer better (Kornblith et al. 2019). Full CIFAR-10, 60m: on 5,340 inner images lite0 0.8525,
    lite2 0.8510 and lite1 0.8495 (one standard error 0.8 points); lite0's final run scored 0.9105,
    lite1's in an earlier run with the same recipe 0.9163."""
    top = ranked[0]
    best = -rank_key(top, only)[0]
    noise = standard_error(best, held_out)
    tied = [top] + [c for c in ranked[1:] if c.kind == top.kind and -rank_key(c, only)[0] >= best - noise]
    chosen = max(tied, key=lambda c: LARGER.get(c.backbone, 0))  # max keeps the first of equals
    if chosen is not top:
        record["tie_break"] = {"within_noise": [c.name for c in tied], "noise": round(noise, 4),
                               "chosen": chosen.name, "ranked_first": top.name}  # fmt: skip
        logs.info(f"auto: {chosen.name} scores within noise ({noise:.3f}) of {top.name}, on a larger "
                  "backbone: it trains")  # fmt: skip
    return chosen
