"""Linear probe: scikit-learn logistic regression (or a linear SVM) on cached backbone features.

The "CNN codes + linear classifier" of the tutorials and the standard baseline of transfer
papers. The regularisation strength C is chosen by stratified cross-validation on the training
set only; the fitted classifier (with its standardisation) is folded into the model's linear head,
so the run folder is used exactly like any other (`headstart.load`, `evaluate`, `export`).
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass

import numpy as np
import torch

from headstart.device import configure_threads, pick_device
from headstart.distributed import DistInfo
from headstart.errors import ConfigError
from headstart.freezing import FrozenProof, apply_strategy, count_params
from headstart.heads import HeadSpec, logits_to_probs
from headstart.model import TransferModel
from headstart.runs import CONFIG, METRICS, RESULTS, SPLIT, save_model, write_json

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
) -> ProbeFit:
    """Standardise, choose C by cross-validation, refit on all data, fold into W, b.

    `groups` (the image of each row, when rows are several views of one image) keeps all views of
    an image in one fold, so CV does not score an image on its own augmented copy.
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
    if classifier == "logistic":
        est = LogisticRegression(max_iter=2000, tol=1e-4)
        scoring = "neg_log_loss"
    else:
        est = LinearSVC(dual="auto", max_iter=5000)
        scoring = "accuracy"
    search = GridSearchCV(
        est,
        {"C": list(CS)},
        cv=(StratifiedGroupKFold if grouped else StratifiedKFold)(folds, shuffle=True, random_state=seed),
        scoring=scoring,
        n_jobs=1,
        refit=False,  # the best C is fitted once, below, on every row
    ).fit(xcv, ycv, **({"groups": gcv} if grouped else {}))
    best_c = float(search.best_params_["C"])
    final = (LogisticRegression(C=best_c, max_iter=3000) if classifier == "logistic"
             else LinearSVC(C=best_c, dual="auto", max_iter=10000)).fit(xs, y)  # fmt: skip
    w, b = final.coef_, final.intercept_
    if w.shape[0] == 1:  # binary: one score s for class 1; logits (-s/2, s/2) give softmax = sigmoid(s)
        w, b = np.concatenate([-w / 2, w / 2]), np.concatenate([-b / 2, b / 2])
    w_folded = w / scaler.scale_
    b_folded = b - w_folded @ scaler.mean_
    n_cv = len(np.unique(gcv))
    return ProbeFit(w_folded, b_folded, best_c, float(search.best_score_), folds, n_cv, classifier)


def run_linear_probe(cfg) -> object:
    """`train --strategy linear-probe`: features once, C by cross-validation, the usual run folder."""
    from headstart.data import resolve_data
    from headstart.train import (
        TrainResult,
        backbone_for,
        feature_datasets,
        log,
        prepare_output,
        preprocess_of,
        run_config,
        seed_everything,
    )

    if HeadSpec.parse(cfg.head).kind != "linear":
        raise ConfigError(f"--strategy linear-probe fits a linear head; received --head {cfg.head}.")
    t_start = time.perf_counter()
    out = prepare_output(cfg.output, overwrite=cfg.overwrite)
    seed_everything(cfg.seed)
    configure_threads()
    device = pick_device(cfg.device)
    split = resolve_data(cfg.data, val=cfg.val, val_fraction=cfg.val_fraction, seed=cfg.seed)
    write_json(out / SPLIT, split.to_dict())
    backbone = backbone_for(cfg, weights=cfg.weights)
    model = TransferModel.build(backbone, HeadSpec("linear"), split.classes)
    apply_strategy(model, "linear-probe")
    trainable, frozen = count_params(model)
    proof = FrozenProof.take(model)
    model.to(device)
    pp = preprocess_of(backbone, cfg.image_size)
    train_ds, val_ds, bad, extract_s, stats = feature_datasets(backbone, split, pp, cfg, device, DistInfo())
    from headstart.train import check_bad_fraction

    check_bad_fraction(bad, split, cfg.max_bad_fraction)

    t_fit = time.perf_counter()
    x_all, y_all, image_of = train_ds.all_views()  # one row per image, or per view with --cache-views
    x_all, y_all, image_of = x_all.float().numpy(), y_all.numpy(), image_of.numpy()
    fit = fit_probe(x_all, y_all, classifier=cfg.classifier, seed=cfg.seed, groups=image_of)
    fit_s = time.perf_counter() - t_fit
    linear = model.head[-1]
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(fit.weight).float())
        linear.bias.copy_(torch.from_numpy(fit.bias).float())
    tr_loss, tr_acc = _score(model, train_ds, device)
    va_loss, va_acc = _score(model, val_ds, device)
    log(
        f"linear probe ({fit.classifier}, C={fit.C:g} by {fit.cv_folds}-fold CV on {fit.cv_samples} "
        f"images): train acc {tr_acc:.4f}, val loss {va_loss:.4f} acc {va_acc:.4f}, fit {fit_s:.1f}s"
    )
    row = {
        "epoch": 1, "train_loss": round(tr_loss, 6), "train_acc": round(tr_acc, 6),
        "val_loss": round(va_loss, 6), "val_acc": round(va_acc, 6), "lr": "", "seconds": round(fit_s, 3),
    }  # fmt: skip
    with open(out / METRICS, "w", newline="") as f:
        w = csv.DictWriter(f, list(row))
        w.writeheader()
        w.writerow(row)
    report = proof.verify(model)
    save_model(out, model, pp, strategy="linear-probe")
    results = {
        "val_accuracy": va_acc,
        "val_loss": va_loss,
        "best_epoch": 1,
        "epochs_run": 1,
        "train_seconds": round(time.perf_counter() - t_start, 3),
        "extract_seconds": round(extract_s, 3),
        "head_train_seconds": round(fit_s, 3),
        **stats,
        "strategy": "linear-probe",
        "classifier": fit.classifier,
        "probe_C": fit.C,
        "probe_cv_score": fit.cv_score,
        "probe_cv_folds": fit.cv_folds,
        "probe_cv_samples": fit.cv_samples,
        "cache_views": cfg.cache_views,
        "backbone": backbone.config.name,
        "head": HeadSpec("linear").describe(backbone.feature_dim, len(split.classes)),
        "unfrozen_modules": [],
        "trainable_params": trainable,
        "frozen_params": frozen,
        **{k: v for k, v in report.items() if k != "changed_frozen_names"},
        "device": str(device),
        "num_train": len(split.train),
        "num_val": len(split.val),
        "classes": split.classes,
        "skipped_files": [s.to_dict() for s in split.skipped + bad],
    }
    write_json(out / RESULTS, results)
    write_json(out / CONFIG, run_config(cfg, device))
    log(f"done: val accuracy {va_acc:.4f}, C={fit.C:g}, {results['train_seconds']:.1f}s -> {out}")
    return TrainResult(out, results, [row])


@torch.inference_mode()
def _score(model: TransferModel, ds, device) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of the head on a feature dataset."""
    x = ds.x.float().to(device)
    y = ds.y.to(device)
    probs = logits_to_probs(model.head(x), "linear")
    loss = torch.nn.functional.nll_loss(torch.log(probs.clamp_min(1e-12)), y).item()
    acc = (probs.argmax(1) == y).float().mean().item()
    return loss, acc
