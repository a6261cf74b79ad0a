"""End to end on the real ant/bee photos with the embedded lite0, network blocked (slow)."""

from __future__ import annotations

import json

import pytest

import headstart

from conftest import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def extract_run(tmp_path_factory):
    from conftest import HYMENOPTERA

    if not HYMENOPTERA.is_dir():
        pytest.skip(f"{HYMENOPTERA} not present")
    run = tmp_path_factory.mktemp("ants") / "run"
    r = run_cli("train", HYMENOPTERA, "--strategy", "extract", "--output", run)
    assert r.returncode == 0, r.stderr
    return run


def test_readme_first_command_auto_within_its_budget(hymenoptera, tmp_path):
    """The README's first command: no strategy named, so auto with its 10-minute budget."""
    import time

    t0 = time.monotonic()
    r = run_cli("train", hymenoptera, "--output", tmp_path / "ants")
    wall = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "ants" / "results.json").read_text())
    assert wall <= 1.1 * res["plan"]["budget_seconds"] == 660
    assert res["val_accuracy"] >= 0.95 and res["frozen_tensors_changed"] == 0
    assert res["plan"]["chosen"] and len(res["plan"]["stages"]) >= 1


def test_extract_defaults_reach_accuracy_with_frozen_proof(extract_run):
    res = json.loads((extract_run / "results.json").read_text())
    assert res["val_accuracy"] >= 0.93
    assert res["frozen_tensors_changed"] == 0 and res["frozen_tensors_checked"] == 294
    assert res["trainable_tensors_changed"] == 2
    assert (res["num_train"], res["num_val"]) == (245, 153)
    assert res["backbone"] == "efficientnet_lite0" and res["strategy"] == "extract"


def test_fresh_process_predicts_same_top1_as_in_process(extract_run, hymenoptera):
    files = sorted(str(p) for p in (hymenoptera / "val").rglob("*.jpg"))[::15]
    r = run_cli("predict", extract_run, *files)
    assert r.returncode == 0, r.stderr
    cli_labels = [line.split("\t")[1] for line in r.stdout.strip().splitlines()]
    inproc = [p.label for p in headstart.load(extract_run).predict(files)]
    assert cli_labels == inproc and len(inproc) == len(files)


def test_evaluate_matches_training_accuracy(extract_run):
    ev = headstart.evaluate(extract_run)
    res = json.loads((extract_run / "results.json").read_text())
    assert ev["accuracy"] == pytest.approx(res["val_accuracy"], abs=1e-9)
    assert ev["num_images"] == 153


def test_finetune_short_run(hymenoptera, tmp_path):
    r = run_cli("train", hymenoptera, "--strategy", "finetune", "--unfreeze", "2", "--epochs", "2",
                "--output", tmp_path / "ft")  # fmt: skip
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert res["val_accuracy"] >= 0.9
    assert res["frozen_tensors_changed"] == 0 and res["frozen_params"] > 0
    assert res["trainable_tensors_changed"] > 2
