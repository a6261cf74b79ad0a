"""Prediction sets and rejection: the maths on problems with known answers, the fit on a run, and
identical sets and rejections from the PyTorch and the ONNX engines."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

import headstart
from headstart.core.errors import ConfigError
from headstart.inference.predictor import load
from headstart.inference.uncertainty import (
    ConformalSets,
    FeatureDistance,
    conformal_quantile,
    held_out_acceptance,
    nonconformity,
    set_mask,
)
from headstart.insight.calibrate import calibrate

from conftest import TINY, make_class_tree, make_image, run_cli


def _calibrated_model_data(n: int, classes: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities from a Dirichlet and labels drawn from them: a perfectly calibrated model."""
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(classes, 0.4), size=n)
    y = (probs.cumsum(1) > rng.random((n, 1))).argmax(1)
    return probs, y


@pytest.mark.parametrize("method", ["lac", "aps"])
@pytest.mark.parametrize("coverage", [0.8, 0.95])
def test_coverage_holds_on_fresh_data(method, coverage):
    probs, y = _calibrated_model_data(2000, seed=1)
    sets = ConformalSets.fit(probs, y, coverage=coverage, method=method)
    test_p, test_y = _calibrated_model_data(40000, seed=2)
    m = sets.mask(test_p)
    covered = m[np.arange(len(test_y)), test_y].mean()
    assert covered == pytest.approx(coverage, abs=0.015)
    assert 1 <= m.sum(1).mean() < probs.shape[1]


def test_sets_grow_when_asked_for_more_coverage_and_aps_is_never_empty():
    probs, y = _calibrated_model_data(1000)
    small = ConformalSets.fit(probs, y, coverage=0.7).mask(probs).sum(1).mean()
    large = ConformalSets.fit(probs, y, coverage=0.97).mask(probs).sum(1).mean()
    assert large > small
    aps = ConformalSets.fit(probs, y, coverage=0.5, method="aps").mask(probs)
    assert aps.sum(1).min() >= 1


def test_scores_by_hand():
    p = np.array([[0.6, 0.3, 0.1]])
    assert nonconformity(p, np.array([1]), "lac") == pytest.approx([0.7])
    assert nonconformity(p, np.array([1]), "aps") == pytest.approx([0.6])  # the mass ranked above
    assert nonconformity(p, np.array([0]), "aps") == pytest.approx([0.0])
    assert set_mask(p, 0.75, "lac").tolist() == [[True, True, False]]  # p >= 0.25
    assert set_mask(p, 0.65, "aps").tolist() == [[True, True, False]]  # 0.6 <= 0.65, 0.9 > 0.65
    assert set_mask(p, 0.5, "aps").tolist() == [[True, False, False]]


def test_quantile_is_finite_sample_valid_and_infinite_when_too_few():
    s = np.arange(1, 20, dtype=float)  # 19 scores: level 0.9 -> the ceil(20 * 0.9) = 18th smallest
    assert conformal_quantile(s, 0.9) == 18.5  # halfway to the 19th: no calibration score on it
    assert (s <= conformal_quantile(s, 0.9)).sum() == 18
    assert (s + 1e-6 <= conformal_quantile(s, 0.9)).sum() == 18  # engines' rounding flips none
    assert conformal_quantile(s, 0.95) == 19.0  # the largest has no next: it stays
    assert math.isinf(conformal_quantile(np.ones(5), 0.95))  # ceil(6 * 0.95) = 6 > 5 scores
    sets = ConformalSets.fit(*_calibrated_model_data(5), coverage=0.95)
    assert sets.mask(np.array([[0.98, 0.01, 0.01, 0, 0]])).all()  # every class, honestly


def test_feature_distance_is_mahalanobis_and_separates_strangers():
    rng = np.random.default_rng(0)
    d = 16
    means = rng.normal(0, 3, (3, d))
    cov = np.diag(rng.uniform(0.5, 2, d))
    y = rng.integers(0, 3, 3000)
    x = means[y] + rng.multivariate_normal(np.zeros(d), cov, 3000)
    dist = FeatureDistance.fit(x, y)
    probe = rng.normal(0, 3, (7, d))
    # the same distance computed directly from the (shrunk) precision matrix
    w = dist.whiten.double().numpy()
    mu = np.stack([x[y == c].mean(0) for c in range(3)])
    direct = np.array([min((p - m) @ w @ w.T @ (p - m) for m in mu) for p in probe])
    assert dist.score(probe) == pytest.approx(direct, rel=1e-3)
    inside = dist.score(means[y[:500]] + rng.multivariate_normal(np.zeros(d), cov, 500))
    strangers = dist.score(rng.normal(0, 3, (500, d)) + 12)
    from sklearn.metrics import roc_auc_score

    auroc = roc_auc_score(np.r_[np.zeros(500), np.ones(500)], np.r_[inside, strangers])
    assert auroc > 0.99
    held = held_out_acceptance(inside, accept=0.9)
    assert held["acceptance_mean"] == pytest.approx(0.9, abs=0.02)


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory) -> Path:
    """A tiny red/green run, calibrated for sets (0.9) and rejection (0.9)."""
    root = tmp_path_factory.mktemp("unknown")
    make_class_tree(root / "data" / "train", per_class=15)
    make_class_tree(root / "data" / "val", per_class=15, seed=500)
    out = root / "run"
    headstart.train(str(root / "data"), strategy="extract", output=str(out), backbone=TINY, weights="none",
                    epochs=10, lr=0.05, batch_size=8, num_workers=0)  # fmt: skip
    calibrate(out, device="cpu", num_workers=0, coverage=0.9, accept=0.9)
    return out


def _strangers(folder: Path) -> list[str]:
    """Blue images: a colour the red/green model never saw."""
    paths = []
    for i in range(6):
        make_image(folder / f"blue{i}.png", (30, 40, 220), seed=900 + i)
        paths.append(str(folder / f"blue{i}.png"))
    return paths


def test_calibrate_records_sets_and_rejection(calibrated_run):
    record = json.loads((calibrated_run / "model.json").read_text())
    assert record["conformal"]["method"] == "lac" and record["conformal"]["coverage"] == 0.9
    assert record["ood"]["accept"] == 0.9 and record["ood"]["train_images"] == 30
    assert (calibrated_run / "ood.safetensors").is_file()
    cal = json.loads((calibrated_run / "results.json").read_text())["calibration"]
    assert 0.0 <= cal["sets"]["held_out"]["coverage_mean"] <= 1.0
    assert cal["ood"]["held_out"]["rounds"] == 200


def test_predict_rejects_strangers_and_keeps_the_ranking(calibrated_run, tmp_path):
    val = sorted(str(p) for p in (calibrated_run.parent / "data" / "val").rglob("*.png"))
    blue = _strangers(tmp_path)
    predictor = load(calibrated_run, device="cpu")
    preds = predictor.predict(val + blue, reject=True, num_workers=0)
    accepted = np.mean([not p.unknown for p in preds[: len(val)]])
    assert accepted >= 0.8  # fitted to accept 90% of these very images
    strangers = preds[len(val) :]
    assert all(p.unknown and p.label == "unknown" for p in strangers)
    assert all(p.labels[0] in ("red", "green") for p in strangers)  # the closest class is still there
    plain = predictor.predict(blue, num_workers=0)
    assert not any(p.unknown for p in plain) and plain[0].ood_score == pytest.approx(strangers[0].ood_score)
    assert all(p.set is not None and set(p.set) <= {"red", "green"} for p in preds)


def test_sets_and_rejection_identical_on_torch_and_onnx(calibrated_run, tmp_path):
    pytest.importorskip("onnxruntime")
    from headstart.deploy.export import export
    from headstart.inference.onnx import load_onnx, read_onnx_metadata

    export(calibrated_run, format="onnx", output=tmp_path / "m.onnx")
    meta = read_onnx_metadata(tmp_path / "m.onnx")
    assert meta["conformal"]["threshold"] == json.loads((calibrated_run / "model.json").read_text())[
        "conformal"]["threshold"]  # fmt: skip
    images = sorted(str(p) for p in (calibrated_run.parent / "data").rglob("*.png")) + _strangers(tmp_path)
    torch_preds = load(calibrated_run, device="cpu").predict(images, reject=True, num_workers=0)
    onnx_preds = load_onnx(tmp_path / "m.onnx").predict(images, reject=True, num_workers=0)
    assert [p.set for p in torch_preds] == [p.set for p in onnx_preds]
    assert [p.unknown for p in torch_preds] == [p.unknown for p in onnx_preds]
    assert any(p.unknown for p in onnx_preds)
    np.testing.assert_allclose(
        [p.ood_score for p in torch_preds], [p.ood_score for p in onnx_preds], rtol=1e-3, atol=1e-3
    )


def test_cli_predict_sets_reject_csv(calibrated_run, tmp_path):
    blue = _strangers(tmp_path / "blue")
    out = tmp_path / "p.csv"
    r = run_cli("predict", calibrated_run, tmp_path / "blue", "--sets", "--reject", "--csv", out,
                "--workers", "0")  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(out, newline="")))
    assert [r["path"] for r in rows] == blue
    assert {r["label"] for r in rows} == {"unknown"} and all(float(r["ood_score"]) > 0 for r in rows)
    assert list(rows[0]) == ["path", "label", "probability", "set", "ood_score", "error"]
    r = run_cli("predict", calibrated_run, blue[0], "--reject", "--sets", "--workers", "0")
    assert r.returncode == 0 and "unknown\t(closest: " in r.stdout and "set={" in r.stdout


def test_sets_asked_of_an_uncalibrated_run_is_a_clear_error(calibrated_run, tmp_path):
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(calibrated_run, plain)
    record = json.loads((plain / "model.json").read_text())
    del record["conformal"], record["ood"]
    (plain / "model.json").write_text(json.dumps(record))
    predictor = load(plain, device="cpu")
    with pytest.raises(ConfigError, match="headstart calibrate RUN"):
        predictor.predict([str(next(calibrated_run.parent.rglob("*.png")))], reject=True)
    r = run_cli("predict", plain, str(calibrated_run.parent / "data" / "val"), "--sets")
    assert r.returncode == 2 and "no prediction sets fitted" in r.stderr


def test_calibrate_rejects_bad_targets(calibrated_run):
    with pytest.raises(ConfigError, match="--coverage must be in"):
        calibrate(calibrated_run, coverage=1.2)
    with pytest.raises(ConfigError, match="Unknown set method"):
        calibrate(calibrated_run, method="raps")


def test_a_damaged_calibration_in_model_json_names_the_key(calibrated_run, tmp_path):
    import shutil

    from headstart.core.errors import DataError

    bad = tmp_path / "bad"
    shutil.copytree(calibrated_run, bad)
    record = json.loads((bad / "model.json").read_text())
    record["ood"]["threshold"] = "far"
    (bad / "model.json").write_text(json.dumps(record))
    with pytest.raises(DataError, match="ood.threshold must be a number >= 0; found 'far'"):
        load(bad, device="cpu")
