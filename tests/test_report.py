"""headstart report: sections, figures, numbers equal to evaluation.json, suspect_labels.csv."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import pytest

from headstart.insight.calibrate import calibrate
from headstart.insight.report import FIGURES, SUSPECT_COLUMNS, build_report
from headstart.training.run import train

from conftest import ROOT, TINY, run_cli

SECTIONS = (
    "summary",
    "facts",
    "curves",
    "confusion",
    "per-class",
    "calibration",
    "unknown",
    "top-losses",
    "suspect-labels",
)


def _value(page: str, key: str) -> str:
    m = re.search(rf'id="{re.escape(key)}" data-value="([^"]+)">([^<]+)<', page)
    assert m, f"{key} not in report"
    return m.group(1), m.group(2)


def _check_against_evaluation(run, page: str) -> dict:
    ev = json.loads((run / "evaluation.json").read_text())
    for key in ("accuracy", "loss", "macro_f1", "ece"):
        raw, shown = _value(page, f"metric-{key}")
        assert float(raw) == ev[key] and shown == f"{ev[key]:.4f}"
    for i, m in enumerate(ev["per_class"].values()):
        for key in ("precision", "recall", "f1", "support"):
            raw, _ = _value(page, f"class{i}-{key}")
            assert float(raw) == m[key]
    cm = ev["confusion_matrix"]["rows_true_cols_pred"]
    for i, row in enumerate(cm):
        for j, v in enumerate(row):
            assert re.search(rf"data-cell='{i},{j}'>(<b>)?{v}(</b>)?</td>", page)
    return ev


def test_report_sections_figures_and_numbers(tmp_path, tiny_split):
    # a short run with a random tiny backbone: some mistakes to show
    res = train(
        tiny_split,
        strategy="extract",
        output=str(tmp_path / "run"),
        backbone=TINY,
        weights="none",
        epochs=4,
        lr=0.05,
        batch_size=8,
        num_workers=0,
    )
    run = res.run_dir
    calibrate(run, device="cpu", num_workers=0, coverage=0.8, accept=0.9)
    path = build_report(run, top_losses=4, suspect_threshold=0.5, device="cpu", num_workers=0)
    page = path.read_text()
    assert path == run / "report.html"
    cal = json.loads((run / "results.json").read_text())["calibration"]
    raw, _ = _value(page, "sets-coverage")  # on the fit's own images: at least the target
    assert float(raw) >= 0.8 and "Held out: coverage" in page
    raw, _ = _value(page, "ood-accepted")
    assert float(raw) >= 0.9 and f"{cal['ood']['held_out']['acceptance_mean']:.4f}" in page
    for s in SECTIONS:
        assert f"id='{s}'" in page, s
    for f in FIGURES:
        assert (run / f).stat().st_size > 1000, f
    # self-contained: images inline, nothing fetched from elsewhere
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"""src=['"](?!data:)""", page)
    assert page.count("data:image/png;base64,") == len(FIGURES)
    assert page.count("<div class='tile'>") == 4
    ev = _check_against_evaluation(run, page)
    # suspects: wrong and at least 0.5 confident = every wrong prediction of a 2-class model
    with open(run / "suspect_labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with open(run / "suspect_labels.csv", newline="") as f:
        assert next(csv.reader(f)) == SUSPECT_COLUMNS
    cm = ev["confusion_matrix"]["rows_true_cols_pred"]
    wrong = sum(cm[i][j] for i in range(2) for j in range(2) if i != j)
    assert len(rows) == wrong
    for r in rows:
        assert r["given_label"] != r["predicted_label"] and float(r["confidence"]) >= 0.5
        assert (tiny_split / "val" / r["given_label"]).as_posix() in r["path"]
    # calibration section quotes before/after on the same images
    before, _ = _value(page, "cal-ece_before")
    after, _ = _value(page, "cal-ece_after")
    assert float(after) <= float(before)


def test_report_cli_on_calibrated_run(tmp_path, tiny_split):
    out = tmp_path / "run"
    train(
        tiny_split,
        strategy="extract",
        output=str(out),
        backbone=TINY,
        weights="none",
        epochs=20,
        lr=0.05,
        batch_size=8,
        num_workers=0,
        calibrate=True,
    )
    r = run_cli("report", out, "--top-losses", "3", "--workers", "0")
    assert r.returncode == 0, r.stderr
    page = (out / "report.html").read_text()
    _check_against_evaluation(out, page)
    assert "stored in <code>model.json</code>" in page
    t = json.loads((out / "model.json").read_text())["temperature"]
    assert float(_value(page, "cal-temperature")[0]) == pytest.approx(t)
    r = run_cli("report", tmp_path / "nope")
    assert r.returncode == 2 and "Traceback" not in r.stderr


@pytest.fixture
def ants_bees() -> Path:
    """HEADSTART_DATA, else ../shared/data beside the repo, else /work/shared/data."""
    for base in (os.environ.get("HEADSTART_DATA"), ROOT.parent / "shared" / "data", "/work/shared/data"):
        if base and (Path(base) / "hymenoptera_data").is_dir():
            return Path(base) / "hymenoptera_data"
    pytest.skip("hymenoptera_data not present")


@pytest.mark.slow
def test_report_on_ants_and_bees(tmp_path, ants_bees):
    run = tmp_path / "run"
    train(ants_bees, output=str(run), strategy="extract", epochs=10, num_workers=1, calibrate=True)
    page = build_report(run, device="cpu", num_workers=1).read_text()
    _check_against_evaluation(run, page)
    cal = json.loads((run / "results.json").read_text())["calibration"]
    assert cal["ece_after"] <= cal["ece_before"]
    assert json.loads((run / "evaluation.json").read_text())["accuracy"] > 0.85
    assert "245 (ants 124, bees 121)" in page and "153 (ants 70, bees 83)" in page


def test_report_escapes_everything_from_the_run_folder_and_runs_the_model_once(
    tmp_path, tiny_split, monkeypatch
):
    """Hostile values in results.json never reach the page as markup; one pass of logits feeds it all."""
    from headstart.inference.predictor import Predictor

    run = train(
        tiny_split,
        strategy="extract",
        output=str(tmp_path / "run"),
        backbone=TINY,
        weights="none",
        epochs=2,
        lr=0.05,
        batch_size=8,
        num_workers=0,
    ).run_dir
    results = json.loads((run / "results.json").read_text())
    evil = "<script>alert(1)</script>"
    results.update(
        best_epoch=evil,
        epochs_run=evil,
        head=evil,
        device=evil,
        skipped_files=[{"path": evil, "reason": evil}],
    )
    (run / "results.json").write_text(json.dumps(results))
    seen = []
    real = Predictor.logits_tensor
    monkeypatch.setattr(Predictor, "logits_tensor", lambda self, x: seen.append(len(x)) or real(self, x))
    page = build_report(run, top_losses=2, device="cpu", num_workers=0).read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert sum(seen) == len(json.loads((run / "split.json").read_text())["val"])  # each image once
    _check_against_evaluation(run, page)
