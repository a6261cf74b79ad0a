"""Temperature scaling: ECE maths, the fit, and that predict reports calibrated probabilities."""

from __future__ import annotations

import json

import numpy as np
import pytest

from headstart.core.metrics import (
    expected_calibration_error,
    fit_temperature,
    probabilities_np,
    reliability_bins,
)
from headstart.inference.predictor import load
from headstart.insight.calibrate import calibrate
from headstart.training.run import train

from conftest import TINY, run_cli


def test_ece_by_hand():
    # two images in bin (0.6, 0.667] both right: |1 - 0.65| * 2/4; two in (0.933, 1] one right
    probs = np.array([[0.65, 0.35], [0.35, 0.65], [0.95, 0.05], [0.95, 0.05]])
    y = np.array([0, 1, 0, 1])
    expected = 0.5 * abs(1 - 0.65) + 0.5 * abs(0.5 - 0.95)
    assert expected_calibration_error(probs, y) == pytest.approx(expected)
    bins = reliability_bins(probs, y)
    assert len(bins) == 15 and sum(b["count"] for b in bins) == 4


def test_fit_recovers_a_known_temperature():
    # labels drawn from softmax(z / 2): the NLL-optimal temperature on z is about 2
    rng = np.random.default_rng(0)
    z = rng.normal(0, 4, (4000, 3))
    p = probabilities_np(z, "linear", 2.0)
    y = np.array([rng.choice(3, p=row) for row in p])
    t = fit_temperature(z, y, "linear")
    assert t == pytest.approx(2.0, rel=0.1)
    assert expected_calibration_error(probabilities_np(z, "linear", t), y) < expected_calibration_error(
        probabilities_np(z, "linear", 1.0), y
    )


def test_binary_head_probabilities_follow_temperature():
    z = np.array([[2.0], [-1.0]])
    p = probabilities_np(z, "binary", 2.0)
    assert p[:, 1] == pytest.approx(1 / (1 + np.exp(-z[:, 0] / 2)))
    assert p.sum(1) == pytest.approx([1, 1])


def _noisy_run(tmp_path, tiny_split, **kw):
    # few epochs with a tiny random backbone: right most of the time, far from calibrated
    return train(
        tiny_split,
        output=str(tmp_path / "run"),
        strategy="extract",
        backbone=TINY,
        weights="none",
        epochs=6,
        lr=0.05,
        batch_size=8,
        num_workers=0,
        **kw,
    )


def test_calibrate_stores_temperature_and_predict_uses_it(tmp_path, tiny_split):
    res = _noisy_run(tmp_path, tiny_split)
    run = res.run_dir
    val_images = sorted(str(p) for p in (tiny_split / "val").rglob("*.png"))
    before = load(run, device="cpu").predict_proba(val_images)
    cal = calibrate(run, device="cpu", num_workers=0)
    assert cal["ece_after"] <= cal["ece_before"]
    assert cal["nll_after"] <= cal["nll_before"] + 1e-9
    assert json.loads((run / "model.json").read_text())["temperature"] == pytest.approx(cal["temperature"])
    assert json.loads((run / "results.json").read_text())["calibration"]["ece_after"] == cal["ece_after"]
    assert cal["temperature"] != pytest.approx(1.0)
    after = load(run, device="cpu").predict_proba(val_images)
    assert not np.allclose(before, after)  # probabilities change
    assert (before.argmax(1) == after.argmax(1)).all()  # the decision does not


def test_calibrate_binary_head(tmp_path, tiny_split):
    run = _noisy_run(tmp_path, tiny_split, head="binary").run_dir
    cal = calibrate(run, device="cpu", num_workers=0)
    assert cal["ece_after"] <= cal["ece_before"]
    probs = load(run, device="cpu").predict_proba(sorted((tiny_split / "val").rglob("*.png")))
    assert probs.shape[1] == 2 and np.allclose(probs.sum(1), 1)


def test_calibrate_refreshes_evaluation(tmp_path, tiny_split):
    from headstart.insight.evaluate import evaluate

    run = _noisy_run(tmp_path, tiny_split).run_dir
    ev0 = evaluate(run, device="cpu", num_workers=0)
    cal = calibrate(run, device="cpu", num_workers=0)
    ev1 = json.loads((run / "evaluation.json").read_text())
    assert ev1["temperature"] == pytest.approx(cal["temperature"])
    assert ev1["calibration"]["ece_before"] == pytest.approx(cal["ece_before"])
    assert ev1["ece"] == pytest.approx(cal["ece_after"], abs=1e-4)
    assert ev1["accuracy"] == ev0["accuracy"]


@pytest.mark.slow
def test_cli_train_calibrate(tmp_path, tiny_split):
    out = tmp_path / "run"
    r = run_cli(
        "train",
        "--strategy",
        "extract",
        tiny_split,
        "-b",
        TINY,
        "--weights",
        "none",
        "--epochs",
        "6",
        "--lr",
        "0.05",
        "--batch-size",
        "8",
        "--workers",
        "0",
        "--calibrate",
        "-o",
        out,
    )
    assert r.returncode == 0, r.stderr
    assert "ece_before=" in r.stdout and "ece_after=" in r.stdout
    cal = json.loads((out / "results.json").read_text())["calibration"]
    assert cal["ece_after"] <= cal["ece_before"]
    assert json.loads((out / "model.json").read_text())["temperature"] == pytest.approx(cal["temperature"])
    r = run_cli("calibrate", tmp_path / "missing")
    assert r.returncode == 2 and "headstart: error:" in r.stderr and "Traceback" not in r.stderr
