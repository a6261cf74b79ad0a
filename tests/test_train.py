"""The training loop and the run-folder contract, on tiny generated images and a tiny backbone."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

import headstart
from headstart.core.device import pick_device
from headstart.core.errors import ConfigError

from conftest import COLORS, TINY, make_class_tree, make_image

FAST = dict(
    strategy="extract", backbone=TINY, weights="none", epochs=12, lr=0.05, batch_size=8, num_workers=0
)


def test_extract_writes_the_run_contract(tiny_split, tmp_path):
    out = tmp_path / "run"
    r = headstart.train(tiny_split, output=out, **FAST)
    for f in ("config.json", "metrics.csv", "model.safetensors", "model.json", "results.json", "split.json"):
        assert (out / f).is_file(), f
    res = json.loads((out / "results.json").read_text())
    for key in (
        "val_accuracy",
        "val_loss",
        "best_epoch",
        "train_seconds",
        "trainable_params",
        "frozen_params",
        "frozen_tensors_checked",
        "frozen_tensors_changed",
        "trainable_tensors_changed",
        "device",
        "num_train",
        "num_val",
        "skipped_files",
    ):
        assert key in res, key
    assert res["val_accuracy"] == 1.0 and r["val_accuracy"] == 1.0
    assert res["frozen_tensors_changed"] == 0 and res["frozen_tensors_checked"] > 50
    assert res["trainable_tensors_changed"] == 2
    assert (res["num_train"], res["num_val"]) == (24, 10)
    # the confusion matrix of the kept weights: every val image once, its diagonal is the accuracy
    assert np.asarray(res["val_confusion"]).sum() == 10 and np.trace(res["val_confusion"]) == 10
    assert res["val_balanced_accuracy"] == 1.0
    assert res["device"] == str(pick_device("auto"))
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert len(rows) == 12
    assert list(rows[0]) == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]
    model = json.loads((out / "model.json").read_text())
    assert model["classes"] == ["green", "red"]
    assert model["backbone"]["name"] == TINY and model["head"]["kind"] == "linear"
    assert model["preprocessing"]["input_size"] == 160
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["options"]["lr"] == 0.05 and cfg["versions"]["torch"] == torch.__version__
    best = rows[res["best_epoch"] - 1]
    assert float(best["val_acc"]) == res["val_accuracy"]


def test_a_class_never_recognised_is_named_at_the_end_of_the_run(tmp_path, caplog):
    # the model learns red vs green; the one 'green' val image is red, so it is never recognised,
    # and accuracy (5/6) hides what balanced accuracy (1/2) shows
    data = tmp_path / "data"
    make_class_tree(data / "train", per_class=12)
    make_class_tree(data / "val", classes=("red",), per_class=5, seed=500)
    make_image(data / "val" / "green" / "000.png", COLORS["red"], seed=900)
    with caplog.at_level("WARNING", logger="headstart"):
        r = headstart.train(data, output=tmp_path / "run", **FAST)
    assert r.results.val_confusion == [[0, 1], [0, 5]]
    assert r.results.val_accuracy == pytest.approx(5 / 6) and r.results.val_balanced_accuracy == 0.5
    assert "1 of 2 classes are never recognised" in caplog.text and "'green' 0 of 1" in caplog.text
    # auto's pilots train through the same function on inner splits: they never print it
    from headstart.data.layout import resolve_data
    from headstart.training.options import as_config
    from headstart.training.run import run

    caplog.clear()
    cfg = as_config(None).with_overrides({**FAST, "data": str(data), "output": str(tmp_path / "pilot")})
    with caplog.at_level("WARNING", logger="headstart"):
        inner = run(cfg, split=resolve_data(data))
    assert inner.results.val_confusion == [[0, 1], [0, 5]] and "never recognised" not in caplog.text


def test_confusion_matrix_is_kept_out_of_results_json_above_100_classes(tmp_path):
    data = tmp_path / "data"
    for part, n in (("train", 2), ("val", 1)):
        for c in range(101):
            for i in range(n):
                color = (c * 2, 255 - c * 2, (c * 37) % 256)
                make_image(data / part / f"c{c:03d}" / f"{i}.png", color, seed=c)
    r = headstart.train(data, output=tmp_path / "run", **{**FAST, "epochs": 1})
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert "val_confusion" not in res and r.results.val_confusion is None
    assert 0 <= res["val_balanced_accuracy"] <= 1  # still computed from the matrix


def test_saved_model_predicts_identically_after_fresh_load(tiny_split, tmp_path):
    r = headstart.train(tiny_split, output=tmp_path / "run", **FAST)
    files = sorted(str(p) for p in (tiny_split / "val").rglob("*.png"))
    p1 = r.load().predict_proba(files)
    p2 = headstart.load(tmp_path / "run").predict_proba(files)
    assert np.array_equal(p1, p2)
    preds = headstart.load(tmp_path / "run").predict(files, top_k=2)
    assert [p.label for p in preds] == [f.split("/")[-2] for f in files]
    assert all(abs(sum(p.probabilities) - 1) < 1e-5 for p in preds)


@pytest.mark.parametrize("strategy", ["finetune", "full", "scratch"])
def test_backbone_training_strategies(tiny_split, tmp_path, strategy):
    r = headstart.train(
        tiny_split, output=tmp_path / strategy, **{**FAST, "strategy": strategy, "epochs": 6, "lr": 0.01}
    )
    res = r.results.to_dict()
    assert res["frozen_tensors_changed"] == 0
    if strategy == "finetune":
        assert res["frozen_params"] > 0 and res["frozen_tensors_checked"] > 0
        assert res["trainable_tensors_changed"] > 2  # backbone tensors moved too
    else:
        assert res["frozen_params"] == 0
    assert res["val_accuracy"] >= 0.5


def test_options_binary_head_sgd_step_schedule_class_weights(tiny_split, tmp_path):
    r = headstart.train(
        tiny_split,
        output=tmp_path / "b",
        head="binary",
        optimizer="sgd",
        schedule="step",
        step_size=5,
        class_weights="balanced",
        label_smoothing=0.1,
        **FAST,
    )
    assert r["val_accuracy"] == 1.0 and r["head"].endswith("→1")
    lrs = [m["lr"] for m in r.metrics]
    assert lrs[0] == pytest.approx(0.05) and lrs[-1] == pytest.approx(0.0005)
    r2 = headstart.train(tiny_split, output=tmp_path / "m", head="mlp:32", dropout=0.1, **FAST)
    assert r2["head"] == "256→32→2"


def test_early_stopping(tiny_split, tmp_path):
    """Validation labels swapped: val only gets worse as training goes on, so it stops early."""
    swapped = tmp_path / "swapped"
    (tiny_split / "val" / "red").rename(tmp_path / "tmp")
    (tiny_split / "val" / "green").rename(tiny_split / "val" / "red")
    (tmp_path / "tmp").rename(tiny_split / "val" / "green")
    (tiny_split / "val").rename(swapped)
    r = headstart.train(
        tiny_split / "train", val=swapped, output=tmp_path / "es", patience=2, **{**FAST, "epochs": 40}
    )
    assert r["epochs_run"] == r["best_epoch"] + 2 < 40


def test_keep_epoch_last_chooses_nothing_on_the_validation_split(tiny_split, tmp_path):
    """Validation labels swapped, so val accuracy falls as training goes on: 'best' keeps an early
    epoch, 'last' keeps the last one and reports its accuracy."""
    swapped = tmp_path / "swapped"
    (tiny_split / "val" / "red").rename(tmp_path / "tmp")
    (tiny_split / "val" / "green").rename(tiny_split / "val" / "red")
    (tmp_path / "tmp").rename(tiny_split / "val" / "green")
    (tiny_split / "val").rename(swapped)
    opts = {**FAST, "epochs": 6}
    best = headstart.train(tiny_split / "train", val=swapped, output=tmp_path / "best", **opts)
    last = headstart.train(
        tiny_split / "train", val=swapped, output=tmp_path / "last", keep_epoch="last", **opts
    )
    assert best["best_epoch"] < 6 and best["val_accuracy"] > last["val_accuracy"]
    assert last["best_epoch"] == 6 and last["val_accuracy"] == last.metrics[-1]["val_acc"]
    files = sorted(str(p) for p in swapped.rglob("*.png"))
    truth = [f.split("/")[-2] for f in files]
    hits = [
        p.label == t for p, t in zip(headstart.load(tmp_path / "last").predict(files), truth, strict=True)
    ]
    assert np.mean(hits) == pytest.approx(last["val_accuracy"])  # the saved model is the last epoch
    with pytest.raises(ConfigError, match="--keep-epoch last"):
        headstart.train(tiny_split / "train", val=swapped, output=tmp_path / "x", keep_epoch="last",
                        patience=2, **opts)  # fmt: skip


def test_refuses_to_overwrite_and_bad_options(tiny_split, tmp_path):
    headstart.train(tiny_split, output=tmp_path / "r", **{**FAST, "epochs": 1})
    with pytest.raises(ConfigError, match="--overwrite"):
        headstart.train(tiny_split, output=tmp_path / "r", **{**FAST, "epochs": 1})
    headstart.train(tiny_split, output=tmp_path / "r", overwrite=True, **{**FAST, "epochs": 1})
    with pytest.raises(ConfigError, match="Unknown train option"):
        headstart.train(tiny_split, strategy="extract", output=tmp_path / "x", epoch=3)
    with pytest.raises(ConfigError, match="strategy"):
        headstart.train(tiny_split, output=tmp_path / "x", strategy="magic")


def test_seeded_runs_repeat(tiny_split, tmp_path):
    a = headstart.train(tiny_split, output=tmp_path / "a", **{**FAST, "strategy": "finetune", "epochs": 2})
    b = headstart.train(tiny_split, output=tmp_path / "b", **{**FAST, "strategy": "finetune", "epochs": 2})
    assert a.metrics[-1]["train_loss"] == b.metrics[-1]["train_loss"]


@pytest.mark.parametrize("weights", ["none", "balanced"])
def test_the_best_epoch_is_judged_by_balanced_accuracy_where_classes_are_weighted(weights):
    """With --class-weights balanced an epoch that gives up the rare class is not 'best' because
    the common class makes up most of the validation images."""
    from types import SimpleNamespace

    from headstart.training.loop import LoopState

    run = SimpleNamespace(cfg=SimpleNamespace(keep_epoch="best", class_weights=weights, epochs=3),
                          model=torch.nn.Linear(2, 2))  # fmt: skip
    state = LoopState(run, None, None, None, None)
    gives_up = {"acc": 0.90, "loss": 0.3, "confusion": [[90, 0], [10, 0]]}  # balanced accuracy 0.50
    both = {"acc": 0.85, "loss": 0.4, "confusion": [[77, 13], [2, 8]]}  # balanced accuracy 0.83
    assert state.keep_best(1, gives_up)
    assert state.keep_best(2, both) == (weights == "balanced")
    assert state.best["epoch"] == (2 if weights == "balanced" else 1)
