"""Balanced accuracy and the warning for classes a model never recognises."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from headstart.core.metrics import balanced_accuracy, unlearnt_classes


def _confusion(y_true, y_pred, k):
    return np.bincount(np.asarray(y_true) * k + np.asarray(y_pred), minlength=k * k).reshape(k, k).tolist()


def test_balanced_accuracy_is_scikit_learns():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    p = np.where(rng.random(200) < 0.7, y, rng.integers(0, 4, 200))
    assert balanced_accuracy(_confusion(y, p, 4)) == pytest.approx(balanced_accuracy_score(y, p))
    # a class absent from the data does not count (scikit-learn warns and drops it too)
    assert balanced_accuracy([[3, 1, 0], [0, 0, 0], [1, 0, 4]]) == pytest.approx((3 / 4 + 4 / 5) / 2)


def test_a_model_that_answers_the_largest_class_is_named():
    # 12 'normal', 2 'benign', 1 'malignant': everything called normal is 0.80 accurate
    cm = [[12, 0, 0], [2, 0, 0], [1, 0, 0]]
    w = unlearnt_classes(cm, ["normal", "benign", "malignant"])
    assert w is not None
    assert "2 of 3 classes" in w and "'benign' 0 of 2" in w and "'malignant' 0 of 1" in w
    assert "100% of the answers are 'normal'" in w and "0.3333" in w and "--class-weights balanced" in w


def test_no_warning_where_errors_are_spread_or_all_classes_are_recognised():
    assert unlearnt_classes([[5, 1], [1, 5]], ["a", "b"]) is None
    # 100 classes of one image each, a third missed at random: noise of a balanced set, not a collapse
    k = 100
    y = np.arange(k)
    p = np.where(np.arange(k) % 3 == 0, (y + 1) % k, y)
    assert unlearnt_classes(_confusion(y, p, k), [str(i) for i in range(k)]) is None
    # only one class in the data: nothing to compare
    assert unlearnt_classes([[0, 4], [0, 0]], ["a", "b"]) is None
