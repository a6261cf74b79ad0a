"""Running `auto`'s pilots: one stage of them (after the frozen passes they share), one pilot on
an inner split of the training images, and the config each trains with."""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from headstart.core import logs
from headstart.core.errors import HeadstartError, RunInterrupted
from headstart.data.layout import DataSplit
from headstart.training.auto.candidates import Candidate, learn
from headstart.training.auto.costs import Epochs, epochs_for, extraction_key, predict, shared_cost
from headstart.training.auto.profile import Speed
from headstart.training.auto.scoring import held_out_scores, selection_metric


@dataclass(frozen=True)
class Runners:
    """How pilots run: `run(cfg, split=...)` trains one; `warm(cfgs, split)` fills the caches of
    pilots that share a frozen pass (shared_pass.warm; None: each computes its own)."""

    run: Callable
    warm: Callable | None = None


def run_stage(cfg, name: str, cands, subs: list[DataSplit], epochs: Epochs, cost: float, speed: Speed,
              runners: Runners, clock: Callable[[], float]) -> dict:  # fmt: skip
    """Every candidate on every subset, after the frozen passes they share: the stage's record,
    predicted and actual seconds included."""
    run, warm = runners.run, runners.warm
    stage = {
        "name": name,
        "folds": len(subs),
        "train_images": len(subs[0].train),
        "val_images": len(subs[0].val),
        # per candidate: what each trains (features: their head epochs)
        "epochs": epochs if isinstance(epochs, int) else {c.name: c.epochs(epochs[c.name]) for c in cands},
        "predicted_seconds": round(cost, 1),
        "candidates": [],
    }
    t0 = clock()
    for sub in subs:
        if warm is not None and (shared := shared_pass(cfg, cands, sub, epochs, speed, warm, clock)):
            stage.setdefault("shared_passes", []).append(shared)
        for c in cands:
            stage["candidates"].append(pilot(cfg, c, sub, epochs_for(epochs, c), speed, run, clock))
    stage["actual_seconds"] = round(clock() - t0, 1)
    return stage


def pilot(
    cfg,
    c: Candidate,
    split: DataSplit,
    epochs: int,
    speed: Speed,
    run: Callable,
    clock: Callable[[], float] = time.monotonic,
) -> dict:
    """Train one candidate on the inner split; its held-out scores (held_out_scores) and its times."""
    predicted = predict(c, speed, split, epochs)
    entry = {"name": c.name, "predicted_seconds": round(predicted, 1)}
    t0 = clock()
    with tempfile.TemporaryDirectory(prefix="headstart-auto-") as tmp, _quiet():
        try:
            r = run(pilot_config(cfg, c, epochs, str(Path(tmp) / "run")), split=split).results
            entry |= held_out_scores(cfg, r)
            if key := extraction_key(c):  # later runs find these images in the cache
                speed.extracted.setdefault(key, set()).update(p for p, _ in split.train + split.val)
        except RunInterrupted:  # Ctrl-C or SIGTERM: stop searching, not just this pilot
            raise
        except HeadstartError as e:  # a recipe that does not apply here (e.g. a backbone that cannot split)
            entry |= dict.fromkeys(("accuracy", "balanced_accuracy", "loss", "score")) | {
                "error": f"{type(e).__name__}: {e}"[:300]
            }
    entry["actual_seconds"] = round(clock() - t0, 1)
    learn(speed, c.cost_kind, predicted, entry["actual_seconds"])
    c.scores.append(entry)
    metric = selection_metric(cfg).replace("_", " ")
    acc = f"inner {metric} {entry['score']:.4f}" if entry.get("accuracy") is not None else entry.get("error")
    logs.info(
        f"auto: {c.name} on {len(split.train)} images: {acc}, {entry['actual_seconds']:.0f}s "
        f"(predicted {predicted:.0f}s)"
    )
    return entry


def pilot_config(cfg, c: Candidate, epochs: int, output: str):
    """The TrainConfig of `c`'s pilot run."""
    options = {
        **c.run_options(cfg),
        "epochs": c.epochs(epochs),
        "calibrate": False,
        "overwrite": True,
        "patience": None,
        # the user's limit on broken files holds for the whole data, in the final run: a small
        # subset can hold more than its share of them
        "max_bad_fraction": 1.0,
        "output": output,
    }
    return cfg.with_overrides(options)


def shared_pass(cfg, cands, split: DataSplit, epochs: Epochs, speed: Speed, warm: Callable,
                clock: Callable[[], float]) -> dict | None:  # fmt: skip
    """The frozen passes that the pilots of `cands` on `split` share, run once (warm), after which
    the cache holds what each of them would compute: their record, predicted and actual seconds
    included (None where no pilots share one)."""
    will = {k: set(v) for k, v in speed.extracted.items()}
    predicted = shared_cost(cands, split, speed, will)
    if not predicted:
        return None
    t0 = clock()
    try:
        with _quiet():
            passes = warm([pilot_config(cfg, c, epochs_for(epochs, c), "unused") for c in cands], split)
    except RunInterrupted:
        raise
    except HeadstartError as e:  # the pilots compute their own, and say what fails for them
        logs.info(f"auto: no shared frozen pass ({type(e).__name__}: {e})")
        return None
    paths = {p for p, _ in split.train + split.val}
    served = [cands[i] for p in passes for i in p["served"]]
    for c in served:
        speed.extracted.setdefault(extraction_key(c), set()).update(paths)
    entry = {
        "served": [c.name for c in served],
        "images": len(paths),
        "computed": sum(p["images"] for p in passes),
        "predicted_seconds": round(predicted, 1),
        "actual_seconds": round(clock() - t0, 1),
    }
    if entry["computed"]:  # a pass is a features run's extraction: it corrects their predictions
        learn(speed, "features", predicted, entry["actual_seconds"])
    logs.info(f"auto: {len(passes)} shared frozen pass(es) on {len(paths)} images for {len(served)} "
              f"pilots, {entry['actual_seconds']:.0f}s (predicted {predicted:.0f}s)")  # fmt: skip
    return entry


@contextlib.contextmanager
def _quiet():
    """Pilot runs log at WARNING: the plan's own lines say what happened."""
    log = logs.logger
    level = log.level
    if log.isEnabledFor(logging.INFO):
        log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)
