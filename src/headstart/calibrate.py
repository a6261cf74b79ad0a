"""Temperature scaling: fit one scalar T on validation logits so that softmax(z / T) is calibrated.

`calibrate(run_dir)` stores T in model.json (the Predictor divides logits by it) and ECE / NLL
before and after in results.json (and evaluation.json when present). Accuracy never changes:
dividing logits by a positive T keeps their order.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from headstart.errors import DataError
from headstart.runs import MODEL_JSON, RESULTS, read_json, write_json

N_BINS = 15
# Bounds on log T: T in [0.05, 20] covers every sane case; hitting a bound is reported.
LOG_T_BOUNDS = (math.log(0.05), math.log(20.0))


@dataclass
class Logits:
    """Raw head outputs (temperature 1) of labelled images, with their paths and failures."""

    paths: list[str]
    y: np.ndarray
    logits: np.ndarray
    head_kind: str
    classes: list[str]
    skipped: list[dict] = field(default_factory=list)

    def probs(self, temperature: float = 1.0) -> np.ndarray:
        """Class probabilities [N, C] at `temperature`."""
        return probs_from_logits(self.logits, self.head_kind, temperature)


def probs_from_logits(logits: np.ndarray, head_kind: str, temperature: float = 1.0) -> np.ndarray:
    """softmax(z / T) (or [1-p, p] for the single-logit binary head), in float64.

    Same maths as heads.logits_to_probs, which works in float32; the fit needs float64.
    """
    from scipy.special import expit, softmax

    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    if head_kind == "binary":
        p = expit(z.reshape(-1))
        return np.stack([1 - p, p], axis=1)
    return softmax(z, axis=1)


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
    return float(
        sum(
            b["count"] / total * abs(b["accuracy"] - b["confidence"])
            for b in reliability_bins(probs, y, n_bins=n_bins)
            if b["count"]
        )
    )


def fit_temperature(logits: np.ndarray, y: np.ndarray, head_kind: str) -> float:
    """The T > 0 minimising validation NLL of softmax(z / T) (bounded scalar search on log T)."""
    from scipy.optimize import minimize_scalar

    if len(y) == 0:
        raise DataError("Cannot fit a temperature on zero images.")
    res = minimize_scalar(
        lambda log_t: nll(probs_from_logits(logits, head_kind, math.exp(log_t)), y),
        bounds=LOG_T_BOUNDS,
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(math.exp(res.x))


def collect_logits(
    run_dir: str | os.PathLike,
    *,
    data: str | None = None,
    device: str = "auto",
    batch_size: int = 64,
    num_workers: int | None = None,
) -> Logits:
    """Raw logits of the run's validation split (or `data`), one forward pass per image."""
    from headstart.data import ImageDataset, make_loader
    from headstart.device import autocast_for, to_device
    from headstart.evaluate import evaluation_items
    from headstart.predict import load

    run_dir = Path(run_dir)
    predictor = load(run_dir, device=device)
    items = evaluation_items(run_dir, predictor.classes, data)
    ds = ImageDataset(items, predictor.transform, draft=predictor.preprocess.resize_size)
    loader = make_loader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    zs, idx, skipped = [], [], []
    with torch.inference_mode():
        for batch in loader:
            skipped += [{"path": items[i][0], "reason": why} for i, why in batch.failed]
            if batch.x is None:
                continue
            with autocast_for(predictor.device):
                z = predictor.model(to_device(batch.x, predictor.device))
            zs.append(z.float().cpu().reshape(len(batch.index), -1))
            idx += batch.index.tolist()
    logits = torch.cat(zs).double().numpy() if zs else np.zeros((0, len(predictor.classes)))
    return Logits(
        paths=[items[i][0] for i in idx],
        y=np.array([items[i][1] for i in idx], dtype=np.int64),
        logits=logits,
        head_kind=predictor.model.head_spec.kind,
        classes=list(predictor.classes),
        skipped=skipped,
    )


def calibration_summary(lg: Logits, temperature: float, *, n_bins: int = N_BINS) -> dict:
    """ECE and NLL at T=1 (before) and at `temperature` (after), plus the reliability bins."""
    before, after = lg.probs(1.0), lg.probs(temperature)
    return {
        "temperature": temperature,
        "ece_before": expected_calibration_error(before, lg.y, n_bins=n_bins),
        "ece_after": expected_calibration_error(after, lg.y, n_bins=n_bins),
        "nll_before": nll(before, lg.y),
        "nll_after": nll(after, lg.y),
        "accuracy": float((after.argmax(1) == lg.y).mean()) if len(lg.y) else 0.0,
        "bins": n_bins,
        "num_images": int(len(lg.y)),
        "at_bound": bool(
            min(abs(math.log(temperature) - b) for b in LOG_T_BOUNDS) < 1e-2
        ),  # e.g. a perfectly separated validation set drives T to the lower bound
        "reliability_before": reliability_bins(before, lg.y, n_bins=n_bins),
        "reliability_after": reliability_bins(after, lg.y, n_bins=n_bins),
    }


def calibrate(
    run_dir: str | os.PathLike,
    *,
    data: str | None = None,
    device: str = "auto",
    batch_size: int = 64,
    num_workers: int | None = None,
) -> dict:
    """Fit a temperature on the validation split, store it in model.json; returns ECE before/after."""
    run_dir = Path(run_dir)
    record = read_json(run_dir / MODEL_JSON)
    lg = collect_logits(run_dir, data=data, device=device, batch_size=batch_size, num_workers=num_workers)
    if len(lg.y) == 0:
        raise DataError(
            f"No readable validation images for {str(run_dir)!r}, so no temperature can be fitted"
            f"{' (' + str(len(lg.skipped)) + ' files failed to load)' if lg.skipped else ''}."
        )
    t = fit_temperature(lg.logits, lg.y, lg.head_kind)
    summary = calibration_summary(lg, t)
    result = {k: v for k, v in summary.items() if not k.startswith("reliability")}
    result["previous_temperature"] = float(record.get("temperature", 1.0))
    result["data"] = data or "validation split of the run"
    result["skipped_files"] = lg.skipped

    record["temperature"] = t
    write_json(run_dir / MODEL_JSON, record)
    if (run_dir / RESULTS).exists():
        results = read_json(run_dir / RESULTS)
        results["calibration"] = result
        write_json(run_dir / RESULTS, results)
    ev_file = run_dir / "evaluation.json"
    if ev_file.exists():  # refresh it: its loss and ECE depend on the temperature
        from headstart.evaluate import evaluate

        ev = read_json(ev_file)
        evaluate(run_dir, data=None if ev.get("data") == "validation split of the run" else ev.get("data"),
                 device=device, batch_size=batch_size, num_workers=num_workers)  # fmt: skip
    return result
