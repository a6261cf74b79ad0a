"""Temperature scaling: fit one scalar T on validation logits so that softmax(z / T) is calibrated.

`calibrate(run_dir)` stores T in model.json (the Predictor divides logits by it) and ECE / NLL
before and after in results.json (and evaluation.json when present). Accuracy never changes:
dividing logits by a positive T keeps their order.
"""

from __future__ import annotations

import os
from pathlib import Path

from headstart.core.errors import DataError
from headstart.core.files import EVALUATION, RESULTS, read_json
from headstart.core.metrics import calibration_summary, fit_temperature
from headstart.inference.logits import run_logits
from headstart.insight.evaluate import evaluate, evaluation_of, write_evaluation
from headstart.models.store import set_temperature
from headstart.training.record import RunResults


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
    predictor, lg = run_logits(
        run_dir, data=data, device=device, batch_size=batch_size, num_workers=num_workers
    )
    if len(lg.y) == 0:
        raise DataError(
            f"No readable validation images for {str(run_dir)!r}, so no temperature can be fitted"
            f"{' (' + str(len(lg.skipped)) + ' files failed to load)' if lg.skipped else ''}."
        )
    t = fit_temperature(lg.logits, lg.y, lg.head_kind)
    summary = calibration_summary(lg.logits, lg.y, lg.head_kind, t)
    result = {k: v for k, v in summary.items() if not k.startswith("reliability")}
    result |= {"previous_temperature": predictor.temperature, "data": lg.data, "skipped_files": lg.skipped}
    set_temperature(run_dir, t)
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
