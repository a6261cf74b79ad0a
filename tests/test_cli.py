"""The CLI in fresh processes (network blocked): summary, train, evaluate, predict."""

from __future__ import annotations

import csv
import json

import headstart

from conftest import TINY, run_cli

TRAIN = [
    "--strategy",
    "extract",
    "--backbone",
    TINY,
    "--weights",
    "none",
    "--epochs",
    "12",
    "--lr",
    "0.05",
    "--batch-size",
    "8",
    "--workers",
    "0",
]


def test_summary_bare_and_after_freezing():
    r = run_cli("summary", "efficientnet_lite0", "--depth", "1")
    assert r.returncode == 0, r.stderr
    assert "Trainable" in r.stdout and "frozen params: 0" in r.stdout
    assert "8 block groups" in r.stdout and "mean (0.5, 0.5, 0.5)" in r.stdout
    r = run_cli("summary", "efficientnet_lite0", "--strategy", "finetune", "--unfreeze", "2")
    assert r.returncode == 0, r.stderr
    assert "blocks.5" in r.stdout and "Partial" in r.stdout
    assert "trainable params: 2,672,802   frozen params: 700,768" in r.stdout


def test_train_evaluate_predict_roundtrip(tiny_split, tmp_path):
    run = tmp_path / "run"
    r = run_cli("train", tiny_split, "--output", run, *TRAIN)
    assert r.returncode == 0, r.stderr
    assert "val_accuracy=1.0000" in r.stdout and "frozen_tensors_changed=0" in r.stdout
    r = run_cli("evaluate", run)
    assert r.returncode == 0, r.stderr
    ev = json.loads((run / "evaluation.json").read_text())
    assert ev["accuracy"] == 1.0 and ev["confusion_matrix"]["rows_true_cols_pred"] == [[5, 0], [0, 5]]
    assert ev["per_class"]["red"]["support"] == 5 and (run / "confusion_matrix.png").stat().st_size > 1000
    one = sorted((tiny_split / "val" / "red").glob("*.png"))[0]
    r = run_cli(
        "predict", run, one, tiny_split / "val" / "green", "--top-k", "2", "--csv", tmp_path / "p.csv"
    )
    assert r.returncode == 0, r.stderr
    rows = list(csv.reader(open(tmp_path / "p.csv")))
    assert rows[0][:5] == ["path", "label", "probability", "label_2", "probability_2"]
    assert len(rows) == 1 + 1 + 5 and rows[1][1] == "red"
    # fresh process top-1 == in-process top-1, probabilities equal to printed precision
    r = run_cli("predict", run, one)
    path, label, prob = r.stdout.strip().split("\t")
    inproc = headstart.load(run).predict([str(one)])[0]
    assert label == inproc.label and abs(float(prob) - inproc.probability) < 1e-4


def test_user_errors_are_one_paragraph(tmp_path):
    r = run_cli("train", "--strategy", "extract", tmp_path / "nope", "--output", tmp_path / "r")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("predict", tmp_path / "norun", "x.jpg")
    assert r.returncode == 2 and "run folder" in r.stderr and "Traceback" not in r.stderr


def test_plan_prints_the_candidates_and_what_they_are_ranked_by(tiny_split):
    base = ["plan", tiny_split, "--budget", "1m", "--backbone", TINY, "--weights", "none"]
    r = run_cli(*base)
    assert r.returncode == 0, r.stderr
    assert "candidates are scored by accuracy on 3 folds" in r.stdout
    assert "extract" in r.stdout and "final s" in r.stdout
    r = run_cli(*base, "--class-weights", "balanced")
    assert r.returncode == 0, r.stderr
    assert "candidates are scored by balanced accuracy on 3 folds" in r.stdout
