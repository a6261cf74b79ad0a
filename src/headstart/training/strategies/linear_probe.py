"""Linear probe: scikit-learn logistic regression (or a linear SVM) on cached backbone features.

The "CNN codes + linear classifier" of the tutorials and the standard baseline of transfer
papers. The regularisation strength C is chosen by stratified cross-validation on the training
set only; the fitted classifier (with its standardisation) is folded into the model's linear head,
so the run folder is used exactly like any other (`headstart.load`, `evaluate`, `export`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from headstart.core import logs
from headstart.core.errors import ConfigError
from headstart.core.files import METRICS
from headstart.core.metrics import confusion_counts, nll, probabilities
from headstart.training.rundir import MetricsLog
from headstart.training.setup import Run
from headstart.training.strategies.base import Fitted, Inputs
from headstart.training.strategies.extract import Extract

CS = np.logspace(-4, 2, 13)  # candidate C values, 10^-4 .. 10^2
CV_MAX_SAMPLES = 10_000  # larger training sets choose C on a stratified subsample


@dataclass
class ProbeFit:
    """The folded linear layer and how C was chosen."""

    weight: np.ndarray  # [C, D]
    bias: np.ndarray  # [C]
    C: float
    cv_score: float
    cv_folds: int
    cv_samples: int
    classifier: str


def fit_probe(
    x: np.ndarray,
    y: np.ndarray,
    *,
    classifier: str = "logistic",
    seed: int = 0,
    groups: np.ndarray | None = None,
    balanced: bool = False,
) -> ProbeFit:
    """Standardise, choose C by cross-validation, refit on all data, fold into W, b.

    `groups` (the image of each row, when rows are several views of one image) keeps all views of
    an image in one fold, so CV does not score an image on its own augmented copy. `balanced`
    (--class-weights balanced) weights the classes by inverse frequency and chooses C by balanced
    accuracy.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold, StratifiedKFold, train_test_split
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    if classifier not in ("logistic", "svm"):
        raise ConfigError(f"--classifier {classifier!r}: use logistic or svm.")
    x = np.asarray(x, dtype=np.float32)
    scaler = StandardScaler().fit(x)
    xs = scaler.transform(x)
    groups = np.arange(len(y)) if groups is None else np.asarray(groups)
    first = np.unique(groups, return_index=True)[1]  # one row per image: its label and group
    counts = np.bincount(y[first])
    folds = int(min(5, counts[counts > 0].min()))
    if folds < 2:
        raise ConfigError("The linear probe needs at least 2 training images per class.")
    xcv, ycv, gcv = xs, y, groups
    if len(first) > CV_MAX_SAMPLES:
        keep, _ = train_test_split(
            groups[first], train_size=CV_MAX_SAMPLES, stratify=y[first], random_state=seed
        )
        mask = np.isin(groups, keep)
        xcv, ycv, gcv = xs[mask], y[mask], groups[mask]
        folds = 3
    grouped = len(np.unique(gcv)) < len(gcv)
    weight = "balanced" if balanced else None
    if classifier == "logistic":
        est = LogisticRegression(max_iter=2000, tol=1e-4, class_weight=weight)
        scoring = "balanced_accuracy" if balanced else "neg_log_loss"
    else:
        est = LinearSVC(dual="auto", max_iter=5000, class_weight=weight)
        scoring = "balanced_accuracy" if balanced else "accuracy"
    search = GridSearchCV(
        est,
        {"C": list(CS)},
        cv=(StratifiedGroupKFold if grouped else StratifiedKFold)(folds, shuffle=True, random_state=seed),
        scoring=scoring,
        n_jobs=1,
        refit=False,  # the best C is fitted once, below, on every row
    ).fit(xcv, ycv, **({"groups": gcv} if grouped else {}))
    best_c = float(search.best_params_["C"])
    final = (
        LogisticRegression(C=best_c, max_iter=3000, class_weight=weight)
        if classifier == "logistic"
        else LinearSVC(C=best_c, dual="auto", max_iter=10000, class_weight=weight)
    ).fit(xs, y)
    w, b = final.coef_, final.intercept_
    if w.shape[0] == 1:  # binary: one score s for class 1; logits (-s/2, s/2) give softmax = sigmoid(s)
        w, b = np.concatenate([-w / 2, w / 2]), np.concatenate([-b / 2, b / 2])
    w_folded = w / scaler.scale_
    b_folded = b - w_folded @ scaler.mean_
    n_cv = len(np.unique(gcv))
    return ProbeFit(w_folded, b_folded, best_c, float(search.best_score_), folds, n_cv, classifier)


class LinearProbe(Extract):
    """`--strategy linear-probe`: the features of extract; C by cross-validation, folded into the head."""

    name, default_epochs, default_lr = "linear-probe", 1, 1e-3  # lr: unused

    def fit(self, run: Run, inputs: Inputs) -> Fitted:
        t0 = time.perf_counter()
        x, y, image_of = inputs.train.all_views()  # one row per image, or per view with --cache-views
        fit = fit_probe(
            x.float().numpy(),
            y.numpy(),
            classifier=run.cfg.classifier,
            seed=run.cfg.seed,
            groups=image_of.numpy(),
            balanced=run.cfg.class_weights == "balanced",
        )
        seconds = time.perf_counter() - t0
        linear = run.model.head[-1]
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(fit.weight).float())
            linear.bias.copy_(torch.from_numpy(fit.bias).float())
        tr_loss, tr_acc, _ = score(run.model.head, inputs.train, run.device)
        va_loss, va_acc, confusion = score(run.model.head, inputs.val, run.device)
        logs.info(
            f"linear probe ({fit.classifier}, C={fit.C:g} by {fit.cv_folds}-fold CV on {fit.cv_samples} "
            f"images): train acc {tr_acc:.4f}, val loss {va_loss:.4f} acc {va_acc:.4f}, fit {seconds:.1f}s"
        )
        row = {
            "epoch": 1,
            "train_loss": round(tr_loss, 6),
            "train_acc": round(tr_acc, 6),
            "val_loss": round(va_loss, 6),
            "val_acc": round(va_acc, 6),
            "lr": "",
            "seconds": round(seconds, 3),
        }
        with MetricsLog(run.out / METRICS, [], enabled=run.dist.is_main) as metrics:
            metrics.add(row)
        extra = {
            "classifier": fit.classifier,
            "probe_C": fit.C,
            "probe_cv_score": fit.cv_score,
            "probe_cv_folds": fit.cv_folds,
            "probe_cv_samples": fit.cv_samples,
        }
        return Fitted([row], 1, va_acc, va_loss, None, seconds, extra=extra, val_confusion=confusion)


@torch.inference_mode()
def score(head: torch.nn.Module, ds, device) -> tuple[float, float, list[list[int]]]:
    """Mean cross-entropy, accuracy and confusion matrix of the head on a feature dataset."""
    probs = probabilities(head(ds.x.float().to(device)), "linear").cpu().double().numpy()
    y = ds.y.numpy()
    confusion = confusion_counts(y, probs.argmax(1), probs.shape[1]).tolist()
    return nll(probs, y), float((probs.argmax(1) == y).mean()) if len(y) else 0.0, confusion
