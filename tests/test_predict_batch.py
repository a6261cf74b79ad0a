"""Batch prediction into a CSV: columns, error rows for bad files, --resume."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

import headstart
from headstart.core.errors import ConfigError
from headstart.deploy.batch import done_paths, predict_to_csv

from conftest import TINY, make_class_tree, make_image, run_cli


@pytest.fixture(scope="module")
def run_and_folder(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("batch")
    make_class_tree(root / "data", per_class=6)
    out = root / "run"
    headstart.train(
        str(root / "data"),
        strategy="extract",
        output=str(out),
        backbone=TINY,
        weights="none",
        epochs=2,
        batch_size=8,
        num_workers=0,
    )
    folder = root / "images"
    make_class_tree(folder, per_class=4, seed=77)
    (folder / "red" / "broken.jpg").write_bytes(b"not a jpeg at all")
    return out, folder


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_csv_columns_and_error_row_for_bad_file(run_and_folder, tmp_path):
    run, folder = run_and_folder
    out = tmp_path / "p.csv"
    r = run_cli("predict", run, folder, "--csv", out, "--top-k", "2", "--workers", "0")
    assert r.returncode == 0, r.stderr
    assert "wrote 9 rows" in r.stdout and "img/s" in r.stdout and "1 unreadable" in r.stdout
    header = out.read_text().splitlines()[0].split(",")
    assert header == ["path", "label", "probability", "label_2", "probability_2", "error"]
    rows = _rows(out)
    bad = [x for x in rows if x["path"].endswith("broken.jpg")]
    assert len(bad) == 1 and bad[0]["label"] == "" and "not an image" in bad[0]["error"]
    good = [x for x in rows if not x["error"]]
    assert len(good) == 8 and all(x["label"] in ("green", "red") for x in good)
    assert all(abs(float(x["probability"]) + float(x["probability_2"]) - 1) < 1e-5 for x in good)


def test_resume_skips_done_rows_and_keeps_one_header(run_and_folder, tmp_path):
    run, folder = run_and_folder
    out = tmp_path / "p.csv"
    predictor = headstart.load(run, device="cpu")
    first = predict_to_csv(predictor, [folder / "green"], out, num_workers=0, progress=False)
    assert first.rows_written == 4 and first.already_done == 0
    # a killed run leaves a half-written last line: it is dropped and that image redone
    with open(out, "a") as f:
        f.write(f"{folder / 'red' / '000.png'},re")
    second = predict_to_csv(predictor, [folder], out, num_workers=0, resume=True, progress=False)
    assert second.already_done == 4 and second.rows_written == 5 and second.errors == 1
    text = out.read_text()
    assert text.count("path,label,probability") == 1
    rows = _rows(out)
    assert len(rows) == 9 and len({x["path"] for x in rows}) == 9
    again = predict_to_csv(predictor, [folder], out, num_workers=0, resume=True, progress=False)
    assert again.rows_written == 0 and again.already_done == 9 and out.read_text() == text
    # without --resume the file is rewritten from scratch
    fresh = predict_to_csv(predictor, [folder / "red"], out, num_workers=0, progress=False)
    assert fresh.rows_written == 5 and len(_rows(out)) == 5


def test_resume_with_other_top_k_is_refused(run_and_folder, tmp_path):
    run, folder = run_and_folder
    out = tmp_path / "p.csv"
    predictor = headstart.load(run, device="cpu")
    predict_to_csv(predictor, [folder / "green"], out, num_workers=0, progress=False)
    with pytest.raises(ConfigError, match="--top-k"):
        done_paths(out, top_k=2)
    r = run_cli("predict", run, folder, "--csv", out, "--resume", "--top-k", "2")
    assert r.returncode == 2 and "Resume with the same options" in r.stderr


def test_resume_cli_appends_new_files(run_and_folder, tmp_path):
    run, folder = run_and_folder
    out = tmp_path / "p.csv"
    assert run_cli("predict", run, folder, "--csv", out, "--workers", "0").returncode == 0
    extra = tmp_path / "more"
    make_image(extra / "x.png", (220, 30, 30))
    r = run_cli("predict", run, folder, extra, "--csv", out, "--resume", "--workers", "0")
    assert r.returncode == 0 and "wrote 1 rows" in r.stdout and "skipped 9 already" in r.stdout
    assert len(_rows(out)) == 10
    r = run_cli("predict", run, folder, "--resume")
    assert r.returncode == 2 and "--resume needs --csv" in r.stderr


def test_predict_runs_the_folded_fast_path_and_matches_the_stored_model(run_and_folder):
    run, folder = run_and_folder
    paths = sorted(str(p) for p in folder.rglob("*.png"))
    fast, exact = headstart.load(run, device="cpu"), headstart.load(run, device="cpu", fast=False)
    before = {k: v.clone() for k, v in fast.model.state_dict().items()}
    p_fast, p_exact = fast.predict_proba(paths), exact.predict_proba(paths)
    net = fast.model.backbone._headstart_fast[1]  # the copy predict ran: BN folded away
    assert net is not fast.model.backbone
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in exact.model.modules())
    assert abs(p_fast - p_exact).max() < 1e-4
    assert (p_fast.argmax(1) == p_exact.argmax(1)).all()
    # the stored model itself is untouched
    assert all(torch.equal(before[k], v) for k, v in fast.model.state_dict().items())
