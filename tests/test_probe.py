"""Linear probe: C by cross-validation, folded exactly into the linear head."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import headstart
from headstart.core.errors import ConfigError
from headstart.training.strategies.linear_probe import CS, fit_probe

from conftest import TINY


def _softmax(z):
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_folded_head_reproduces_sklearn_probabilities(n_classes):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(n_classes), 30)
    x = rng.normal(size=(len(y), 16)) * 3 + 5 + y[:, None] * 0.8
    fit = fit_probe(x, y, seed=0)
    assert fit.C in CS and fit.cv_folds == 5 and fit.weight.shape == (n_classes, 16)
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=fit.C, max_iter=3000)).fit(x, y)
    ours = _softmax(x @ fit.weight.T + fit.bias)
    assert np.allclose(ours, ref.predict_proba(x), atol=1e-6)


def test_svm_and_bad_classifier():
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1], 20)
    x = rng.normal(size=(40, 8)) + y[:, None] * 2
    fit = fit_probe(x, y, classifier="svm")
    assert fit.classifier == "svm" and ((x @ fit.weight.T + fit.bias).argmax(1) == y).mean() > 0.9
    with pytest.raises(ConfigError, match="logistic or svm"):
        fit_probe(x, y, classifier="forest")


def test_linear_probe_run_folder(tiny_split, tmp_path):
    r = headstart.train(tiny_split, output=tmp_path / "lp", strategy="linear-probe", backbone=TINY,
                        weights="none", num_workers=0)  # fmt: skip
    res = json.loads((tmp_path / "lp" / "results.json").read_text())
    assert res["val_accuracy"] == 1.0 and res["probe_C"] in CS and res["classifier"] == "logistic"
    assert res["frozen_tensors_changed"] == 0 and res["trainable_tensors_changed"] == 2
    files = sorted(str(p) for p in (tiny_split / "val").rglob("*.png"))
    preds = headstart.load(tmp_path / "lp").predict(files)
    assert [p.label for p in preds] == [f.split("/")[-2] for f in files]
    assert headstart.evaluate(tmp_path / "lp")["accuracy"] == r["val_accuracy"]
    with pytest.raises(ConfigError, match="linear head"):
        headstart.train(tiny_split, output=tmp_path / "x", strategy="linear-probe", head="mlp:8",
                        backbone=TINY, weights="none")  # fmt: skip


@pytest.mark.slow
def test_linear_probe_on_ants_and_bees(hymenoptera, tmp_path):
    r = headstart.train(hymenoptera, output=tmp_path / "lp", strategy="linear-probe")
    assert r["val_accuracy"] >= 0.93


def test_views_of_one_image_stay_in_one_cv_fold():
    # Labels are noise, so an honest CV score is near chance; if copies of an image (views) could
    # land in train and test folds, the SVM would score them by memory.
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 40)), rng.integers(0, 2, 60)
    xv = np.concatenate([x, x + 1e-3 * rng.normal(size=x.shape)])
    yv, groups = np.concatenate([y, y]), np.concatenate([np.arange(60), np.arange(60)])
    leaky = fit_probe(xv, yv, classifier="svm")
    grouped = fit_probe(xv, yv, classifier="svm", groups=groups)
    assert leaky.cv_score > 0.85 and grouped.cv_score < 0.7
    assert (leaky.cv_samples, grouped.cv_samples) == (120, 60)


@pytest.mark.parametrize("classifier", ["logistic", "svm"])
def test_balanced_probe_recalls_the_rare_class(classifier):
    """--class-weights balanced reaches the probe: classes weighted by inverse frequency, C chosen
    by balanced accuracy, so a rare class that overlaps a common one is no longer given up."""
    rng = np.random.default_rng(3)
    y = np.repeat([0, 1], [300, 15])
    x = rng.normal(size=(len(y), 8))
    x[:, 0] += 1.5 * y  # the rare class is shifted along one direction only: the classes overlap
    rare = y == 1

    def recall(fit):
        return ((x @ fit.weight.T + fit.bias).argmax(1)[rare] == 1).mean()

    plain, balanced = (
        fit_probe(x, y, classifier=classifier),
        fit_probe(x, y, classifier=classifier, balanced=True),
    )
    assert recall(plain) < 0.5 < recall(balanced)
    if classifier == "logistic":  # the folded head is sklearn's balanced model
        ref = LogisticRegression(C=balanced.C, max_iter=3000, class_weight="balanced")
        ref = make_pipeline(StandardScaler(), ref).fit(x, y)
        assert np.allclose(_softmax(x @ balanced.weight.T + balanced.bias), ref.predict_proba(x), atol=1e-6)


@pytest.mark.parametrize("weights", ["none", "balanced"])
def test_a_probe_run_passes_class_weights_on(tiny_split, tmp_path, monkeypatch, weights):
    from headstart.training.strategies import linear_probe

    seen, real = [], linear_probe.fit_probe
    monkeypatch.setattr(linear_probe, "fit_probe", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    headstart.train(tiny_split, output=tmp_path / "lp", strategy="linear-probe", backbone=TINY,
                    weights="none", num_workers=0, class_weights=weights)  # fmt: skip
    assert [kw["balanced"] for kw in seen] == [weights == "balanced"]
