"""Training survives bad files: every odd mode loads correctly, every broken file is listed with why."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from bad_images import (
    cmyk_jpeg,
    exif_rotated_jpeg,
    huge_png_header,
    make_bad_tree,
    palette_transparent_png,
    png16,
    rgba_png,
    text_as_jpg,
    truncated_jpeg,
    zero_bytes,
)
from PIL import Image

from headstart.core.errors import DataError
from headstart.data.images import load_image
from headstart.training.run import train

from conftest import TINY, make_class_tree, run_cli

REASONS = {
    "truncated.jpg": "truncated file",
    "zero.jpg": "empty file (0 bytes)",
    "notes.jpg": "not an image: a text file with a .jpg extension",
    "bomb.png": "decompression bomb",
}


def test_modes_convert_to_rgb_correctly(tmp_path):
    p = tmp_path / "x"
    cmyk_jpeg(p.with_suffix(".cmyk.jpg"))
    r, g, b = np.asarray(load_image(p.with_suffix(".cmyk.jpg"))).reshape(-1, 3).mean(0)
    assert r > 180 and g < 70 and b < 70, "CMYK red must stay red"

    png16(tmp_path / "mid.png", level=40000)
    png16(tmp_path / "dark.png", level=100)
    mid, dark = np.asarray(load_image(tmp_path / "mid.png")), np.asarray(load_image(tmp_path / "dark.png"))
    assert abs(int(mid.mean()) - round(40000 / 65535 * 255)) <= 1, "16-bit must be scaled, not clipped"
    assert dark.max() <= 1, "a dark 16-bit frame is not stretched to 8-bit range"

    palette_transparent_png(tmp_path / "pal.png")
    pal = np.asarray(load_image(tmp_path / "pal.png"))
    assert (pal[:, :20] == 255).all(), "transparent pixels are composited on white"
    assert pal[:, 20:, 0].mean() > 180 and pal[:, 20:, 1].mean() < 90

    rgba_png(tmp_path / "rgba.png")
    rgba = np.asarray(load_image(tmp_path / "rgba.png")).reshape(-1, 3).mean(0)
    assert 200 < rgba[0] < 250 and 120 < rgba[1] < 170, "50% alpha red on white is pink"

    exif_rotated_jpeg(tmp_path / "rot.jpg")
    assert Image.open(tmp_path / "rot.jpg").size == (60, 30)
    assert load_image(tmp_path / "rot.jpg").size == (30, 60), "EXIF orientation 6 applied"

    uni = tmp_path / "ñoño 例 with spaces.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(uni)
    assert load_image(uni).getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize("side", [100_000, 10_000])  # error-sized, and warning-sized (> 89M pixels)
def test_decompression_bomb_refused_from_the_header(tmp_path, side):
    p = tmp_path / "bomb.png"
    huge_png_header(p, side)
    assert p.stat().st_size < 200
    with pytest.raises((Image.DecompressionBombError, Image.DecompressionBombWarning)):
        load_image(p)


@pytest.mark.parametrize("strategy", ["extract", "finetune"])
def test_training_lists_exactly_the_broken_files(tmp_path, strategy):
    made = make_bad_tree(tmp_path / "data")
    r = train(
        tmp_path / "data",
        output=tmp_path / "run",
        backbone=TINY,
        weights="none",
        strategy=strategy,
        epochs=2,
        lr=0.05,
        batch_size=8,
        num_workers=0,
        max_bad_fraction=0.2,
    )
    results = json.loads((r.run_dir / "results.json").read_text())
    skipped = {s["path"]: s["reason"] for s in results["skipped_files"]}
    expected = {str(p) for p in made["broken"]} | {str(p) for p in made["empty"]}
    assert set(skipped) == expected
    for p in made["broken"]:
        assert skipped[str(p)].startswith(REASONS[p.name]), skipped[str(p)]
    assert "empty class folder" in skipped[str(made["empty"][0])]
    assert results["classes"] == ["green", "red"]
    # every converted file was trained on: train items minus the broken ones
    assert results["num_train"] == 12 + 12 + len(made["broken"]) + len(made["converted"])


def broken_60(root: Path, n_bad: int) -> list[Path]:
    """60 images (train 2x24, val 2x6) of which n_bad are replaced by broken files."""
    make_class_tree(root / "train", per_class=24)
    make_class_tree(root / "val", per_class=6, seed=500)
    victims = sorted((root / "train").rglob("*.png"))[::4][:n_bad]
    breakers = [truncated_jpeg, zero_bytes, text_as_jpg]
    out = []
    for i, p in enumerate(victims):
        p.unlink()
        q = p.with_suffix(".jpg")
        breakers[i % 3](q)
        out.append(q)
    assert sum(1 for _ in root.rglob("*.*")) == 60
    return out


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["extract", "finetune"])
def test_3_of_60_broken_trains_to_the_end(tmp_path, strategy):
    bad = broken_60(tmp_path / "data", 3)
    r = train(
        tmp_path / "data",
        output=tmp_path / "run",
        backbone=TINY,
        weights="none",
        strategy=strategy,
        epochs=3,
        lr=0.05,
        batch_size=8,
        num_workers=0,
    )
    assert r.results.epochs_run == 3
    assert sorted(s["path"] for s in r.results.skipped_files) == sorted(map(str, bad))


@pytest.mark.parametrize("strategy", ["extract", "finetune"])
def test_10_of_60_broken_stops_with_the_threshold_message(tmp_path, strategy):
    broken_60(tmp_path / "data", 10)
    with pytest.raises(DataError, match=r"(\d+) of 60 images could not be loaded \(limit 5%") as e:
        train(
            tmp_path / "data",
            output=tmp_path / "run",
            backbone=TINY,
            weights="none",
            strategy=strategy,
            epochs=3,
            batch_size=8,
            num_workers=0,
        )
    # extract reads every file first; finetune stops as soon as the count passes 5% (3 of 60)
    n = int(re.search(r"(\d+) of 60", str(e.value)).group(1))
    assert n == 10 if strategy == "extract" else 3 < n <= 10
    assert "headstart doctor" in str(e.value)
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_threshold_cli_exit_code_and_doctor_pointer(tmp_path):
    broken_60(tmp_path / "data", 10)
    r = run_cli(
        "train",
        "--strategy",
        "extract",
        tmp_path / "data",
        "-o",
        tmp_path / "run",
        "--backbone",
        TINY,
        "--weights",
        "none",
        "--epochs",
        "2",
        "--workers",
        "0",
    )
    assert r.returncode == 2
    assert "headstart doctor" in r.stderr and "--max-bad-fraction" in r.stderr
    assert "Traceback" not in r.stderr
    assert "of 60 images could not be loaded" in r.stderr
