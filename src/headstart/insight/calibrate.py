"""Calibration on the validation split: a temperature, prediction sets and a rejection threshold.

`calibrate(run_dir)` fits, on one pass over the validation images,
- temperature scaling: one scalar T so that softmax(z / T) is calibrated (accuracy never changes:
  dividing logits by a positive T keeps their order);
- split-conformal prediction sets at `coverage` (on the temperature-scaled probabilities);
- an out-of-distribution threshold accepting `accept` of the validation images, on the distance of
  their features to class statistics of (a stratified sample of) the training images.
model.json stores what predict needs (T, the set threshold, the rejection threshold; ood.safetensors
the class statistics); results.json the numbers, with coverage and acceptance measured on held-out
halves of the validation split, so they are not the in-sample numbers the fit guarantees.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from headstart.core.errors import ConfigError, DataError
from headstart.core.files import EVALUATION, MODEL_JSON, RESULTS, SPLIT, read_json, write_json
from headstart.core.metrics import calibration_summary, fit_temperature
from headstart.inference.logits import Logits, collect_logits, run_logits, split_items
from headstart.inference.predictor import Predictor
from headstart.inference.uncertainty import (
    OOD_FILE,
    SET_METHODS,
    ConformalSets,
    FeatureDistance,
    Rejection,
    conformal_quantile,
    held_out_acceptance,
    held_out_coverage,
)
from headstart.insight.evaluate import evaluate, evaluation_of, write_evaluation
from headstart.models.store import save_weights
from headstart.training.record import RunResults

TRAIN_SAMPLE = 2000  # training images whose features give the class statistics (stratified)


def calibrate(
    run_dir: str | os.PathLike,
    *,
    data: str | None = None,
    device: str = "auto",
    batch_size: int = 64,
    num_workers: int | None = None,
    coverage: float | None = 0.95,
    method: str = "lac",
    accept: float | None = 0.95,
    train_sample: int = TRAIN_SAMPLE,
) -> dict:
    """Fit temperature, prediction sets (coverage) and rejection (accept) on the validation split.

    coverage=None or accept=None skips that part. Returns the numbers also written to results.json.
    """
    _check_targets(coverage, accept, method)
    run_dir = Path(run_dir)
    predictor, lg = run_logits(
        run_dir, data=data, device=device, batch_size=batch_size, num_workers=num_workers,
        features=accept is not None,
    )  # fmt: skip
    if len(lg.y) == 0:
        raise DataError(
            f"No readable validation images for {str(run_dir)!r}, so no temperature can be fitted"
            f"{' (' + str(len(lg.skipped)) + ' files failed to load)' if lg.skipped else ''}."
        )
    t = fit_temperature(lg.logits, lg.y, lg.head_kind)
    summary = calibration_summary(lg.logits, lg.y, lg.head_kind, t)
    result = {k: v for k, v in summary.items() if not k.startswith("reliability")}
    result |= {"previous_temperature": predictor.temperature, "data": lg.data, "skipped_files": lg.skipped}
    record = read_json(run_dir / MODEL_JSON)
    record["temperature"] = float(t)  # predict divides logits by it
    for key in ("conformal", "ood"):
        record.pop(key, None)  # refitted below, or dropped when not asked for: never stale
    if coverage is not None:
        sets, result["sets"] = fit_sets(lg, t, coverage=coverage, method=method)
        record["conformal"] = sets.to_dict()
    if accept is not None:
        rejection, result["ood"] = fit_rejection(
            run_dir, predictor, lg, accept=accept, train_sample=train_sample, batch_size=batch_size,
            num_workers=num_workers,
        )  # fmt: skip
        record["ood"] = rejection.to_dict()
    else:
        (run_dir / OOD_FILE).unlink(missing_ok=True)
    write_json(run_dir / MODEL_JSON, record)
    if (run_dir / RESULTS).exists():
        results = RunResults.read(run_dir)
        results.calibration = result
        results.write(run_dir)
    if (run_dir / EVALUATION).exists():  # refresh it: its loss and ECE depend on the temperature
        ev_data = read_json(run_dir / EVALUATION).get("data")
        if ev_data == lg.data:  # the same images: reuse this pass of logits
            write_evaluation(run_dir, evaluation_of(lg, t, run_dir))
        else:
            evaluate(run_dir, data=ev_data, device=device, batch_size=batch_size, num_workers=num_workers)
    return result


def _check_targets(coverage: float | None, accept: float | None, method: str) -> None:
    for name, v in (("coverage", coverage), ("accept", accept)):
        if v is not None and not 0.5 <= v < 1:
            raise ConfigError(f"--{name} must be in [0.5, 1), e.g. 0.95; got {v}.")
    if method not in SET_METHODS:
        raise ConfigError(f"Unknown set method {method!r}; use one of {', '.join(SET_METHODS)}.")


def fit_sets(lg: Logits, temperature: float, *, coverage: float, method: str) -> tuple[ConformalSets, dict]:
    """Conformal sets fitted on all validation images, with coverage measured on held-out halves."""
    probs = lg.probs(temperature)
    sets = ConformalSets.fit(probs, lg.y, coverage=coverage, method=method)
    sizes = sets.mask(probs).sum(1)
    summary = sets.to_dict() | {
        "held_out": held_out_coverage(probs, lg.y, coverage=coverage, method=method),
        "set_size_mean": float(sizes.mean()),
        "set_size_counts": {
            int(k): int(v) for k, v in zip(*np.unique(sizes, return_counts=True), strict=True)
        },
    }
    if not np.isfinite(sets.threshold):
        summary["warning"] = (
            f"{len(lg.y)} validation images are too few for coverage {coverage}: every set holds "
            "every class. Use a larger validation split or a lower --coverage."
        )
    return sets, summary


def fit_rejection(
    run_dir: Path,
    predictor: Predictor,
    lg: Logits,
    *,
    accept: float,
    train_sample: int,
    batch_size: int,
    num_workers: int | None,
) -> tuple[Rejection, dict]:
    """Class statistics from training features, a threshold accepting `accept` of validation images."""
    items = split_items(run_dir, "train", train_sample)
    tr = collect_logits(predictor, items, batch_size=batch_size, num_workers=num_workers, features=True,
                        desc="train features")  # fmt: skip
    if tr.features is None or len(np.unique(tr.y)) < 2:
        raise DataError(f"Too few readable training images in {str(run_dir / SPLIT)!r} to fit rejection.")
    distance = FeatureDistance.fit(tr.features, tr.y)
    save_weights(run_dir / OOD_FILE, distance.state_dict(), {"format": 1})
    scores = distance.score(lg.features)
    rejection = Rejection(
        threshold=conformal_quantile(scores, accept),
        accept=accept,
        calibration_images=len(scores),
        train_images=len(tr.y),
        feature_dim=int(tr.features.shape[1]),
    )
    predictor.distance, predictor.rejection = distance, rejection
    summary = rejection.to_dict() | {"held_out": held_out_acceptance(scores, accept=accept)}
    if not np.isfinite(rejection.threshold):
        summary["warning"] = (
            f"{len(scores)} validation images are too few for accept {accept}: nothing will be "
            "rejected. Use a larger validation split or a lower --accept."
        )
    return rejection, summary
