"""headstart doctor: finds unusable, converted, odd, tiny, duplicate, leaking and stray files."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from bad_images import make_bad_tree
from PIL import Image

from headstart.core.errors import ConfigError
from headstart.data.doctor import diagnose, format_report, quarantine
from headstart.data.inspect import near_duplicate_groups

from conftest import run_cli


def smooth(seed: int, size: int = 64) -> Image.Image:
    """A structured (not noise) image, so a resized re-encode stays perceptually the same."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).resize(
        (size, size), Image.Resampling.BICUBIC
    )


@pytest.fixture
def messy(tmp_path) -> tuple[Path, dict]:
    root = tmp_path / "data"
    made = make_bad_tree(root)
    tr, va = root / "train", root / "val"
    shutil.copy(tr / "red" / "000.png", tr / "red" / "dup of 000.png")  # exact, within class
    shutil.copy(tr / "red" / "001.png", tr / "green" / "conflict.png")  # exact, across classes
    shutil.copy(tr / "green" / "002.png", va / "green" / "leak.png")  # exact, train/val leakage
    smooth(1).save(tr / "red" / "smooth.png")
    buf = io.BytesIO()
    smooth(1).resize((48, 48)).save(buf, "JPEG", quality=70)
    (va / "red" / "smooth small.jpg").write_bytes(buf.getvalue())  # near duplicate, leakage
    smooth(2, size=20).save(tr / "green" / "tiny.png")
    frames = [smooth(3 + i) for i in range(2)]
    frames[0].save(tr / "green" / "anim.gif", save_all=True, append_images=frames[1:])
    smooth(5).save(tr / "green" / "mismatch.jpg", format="PNG")
    (tr / "red" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tr / "red" / ".hidden.jpg").write_bytes(b"x")
    (tr / "red" / "README.txt").write_text("notes")
    (root / "__MACOSX" / "train").mkdir(parents=True)
    (root / "__MACOSX" / "train" / "._000.png").write_bytes(b"x")
    return root, made


def by_path(rows: list[dict], key: str) -> dict[str, str]:
    return {r["path"]: r[key] for r in rows}


def test_doctor_finds_every_kind_of_problem(messy):
    root, made = messy
    r = diagnose(root, input_size=56)  # tiny: short side < 28 px
    unusable = by_path(r.unusable, "reason")
    assert unusable == {
        "train/red/truncated.jpg": unusable["train/red/truncated.jpg"],
        "train/red/zero.jpg": "empty file (0 bytes)",
        "train/red/notes.jpg": "not an image: a text file with a .jpg extension",
        "train/red/bomb.png": unusable["train/red/bomb.png"],
    }
    assert unusable["train/red/truncated.jpg"].startswith("truncated file")
    assert unusable["train/red/bomb.png"].startswith("decompression bomb")

    conv = by_path(r.converted, "how")
    assert conv["train/red/cmyk.jpg"] == "CMYK -> RGB"
    assert conv["train/red/deep16.png"].startswith("16-bit")
    assert conv["train/red/palette alpha.png"].startswith("palette with transparency")
    assert conv["train/red/rgba.png"].startswith("RGBA")
    assert conv["train/red/rotated.jpg"] == "EXIF-rotated (orientation 6)"
    assert "train/red/café ñoño 例.png" not in conv and "train/red/000.png" not in conv

    notes = by_path(r.notes, "note")
    assert "2 frames" in notes["train/green/anim.gif"]
    assert "content is PNG" in notes["train/green/mismatch.jpg"]
    assert "only 1 distinct colours" in notes["train/red/deep16.png"]
    assert by_path(r.tiny, "size") == {"train/green/tiny.png": "20x20"}

    dups = {(d["kind"], d["scope"]): d["files"] for d in r.duplicates}
    assert dups[("exact", "within class")] == ["train/red/000.png", "train/red/dup of 000.png"]
    assert dups[("exact", "conflicting labels (across classes)")] == [
        "train/green/conflict.png",
        "train/red/001.png",
    ]
    assert sorted(dups[("exact", "train/val leakage")]) == ["train/green/002.png", "val/green/leak.png"]
    assert sorted(dups[("near", "train/val leakage")]) == ["train/red/smooth.png", "val/red/smooth small.jpg"]
    assert len(r.duplicates) == 4, r.duplicates

    stray = by_path(r.stray, "reason")
    assert set(stray) == {
        "__MACOSX",
        "train/purple",
        "train/red/.DS_Store",
        "train/red/.hidden.jpg",
        "train/red/README.txt",
    }
    assert "empty class folder" in stray["train/purple"]

    # usable counts: the broken four are left out, everything else is counted
    n_red = 12 + len(made["converted"]) + 2  # + dup of 000, smooth
    assert r.counts == {"train": {"green": 12 + 4, "red": n_red}, "val": {"green": 5, "red": 5}}
    assert r.imbalance_ratio == round(n_red / 16, 3)
    total = n_red + 16
    assert r.class_weights == {"green": round(total / 32, 4), "red": round(total / (2 * n_red), 4)}

    text = format_report(r)
    for needle in (
        "unusable files (4)",
        "train/red/zero.jpg",
        "train/val leakage",
        "stray files and folders (5)",
    ):
        assert needle in text


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root reads anything")
def test_unreadable_permission(tmp_path):
    from conftest import make_class_tree

    make_class_tree(tmp_path / "d", per_class=2)
    p = tmp_path / "d" / "red" / "000.png"
    p.chmod(0)
    try:
        assert by_path(diagnose(tmp_path / "d").unusable, "reason") == {
            "red/000.png": "unreadable: permission denied"
        }
    finally:
        p.chmod(0o644)


def test_quarantine_moves_keeps_paths_writes_manifest_never_deletes(messy, tmp_path):
    root, made = messy
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in made["broken"]}
    dest = tmp_path / "quarantine"
    with pytest.raises(ConfigError, match="inside the dataset"):
        quarantine(diagnose(root), root / "q")
    moved = quarantine(diagnose(root), dest)
    assert len(moved) == 4
    for p, digest in before.items():
        target = dest / p.relative_to(root)
        assert not p.exists() and hashlib.sha256(target.read_bytes()).hexdigest() == digest
    manifest = json.loads((dest / "quarantine.json").read_text())
    assert {Path(m["from"]) for m in manifest["moved"]} == set(before)
    assert all(m["reason"] for m in manifest["moved"])
    assert diagnose(root).unusable == []
    # a second quarantine of a same-named file keeps both
    (root / "train" / "red" / "zero.jpg").write_bytes(b"")
    quarantine(diagnose(root), dest)
    assert (dest / "train" / "red" / "zero.jpg").exists() and (dest / "train" / "red" / "zero.1.jpg").exists()
    assert len(json.loads((dest / "quarantine.json").read_text())["moved"]) == 5


def test_cli_json_and_table(messy, tmp_path):
    root, _ = messy
    r = run_cli("doctor", root, "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert len(report["unusable"]) == 4 and report["files_scanned"] == len(list(root.rglob("*.*"))) - 4
    r = run_cli("doctor", root, "--strict")
    assert r.returncode == 1 and "unusable files (4)" in r.stdout
    r = run_cli("doctor", root / "nope")
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_near_duplicate_grouping_is_transitive_and_thresholded():
    h = [0b0, 0b1111, 0b1111_1111, (1 << 64) - 1]
    assert near_duplicate_groups(h, max_bits=4) == [[0, 1, 2]]
    assert near_duplicate_groups(h, max_bits=3) == []
    # a pHash that disagrees breaks the dHash match (1 <-> 2), so the chain splits
    assert near_duplicate_groups(h, [0, 0, (1 << 64) - 1, 0], max_bits=4) == [[0, 1]]


def shared_data() -> Path:
    """HEADSTART_DATA, else the data beside the repo, else /work/shared/data."""
    from conftest import ROOT

    for d in (os.environ.get("HEADSTART_DATA"), ROOT.parent / "shared" / "data", "/work/shared/data"):
        if d and (Path(d) / "hymenoptera_data").is_dir():
            return Path(d)
    pytest.skip("hymenoptera_data not present")


def test_banded_near_duplicate_search_equals_all_pairs():
    rng = np.random.default_rng(0)
    h = rng.integers(0, 2**63, 3000, dtype=np.uint64)
    flips = rng.integers(0, 64, (300, 3)).astype(np.uint64)  # plant 300 near copies (<= 3 bits off)
    near = (
        h[:300]
        ^ (np.uint64(1) << flips[:, 0])
        ^ (np.uint64(1) << flips[:, 1])
        ^ (np.uint64(1) << flips[:, 2])
    )
    h = np.concatenate([h, near])
    ii, jj = np.nonzero(np.triu(np.bitwise_count(h[:, None] ^ h[None, :]) <= 4, 1))
    brute = sorted(zip(ii.tolist(), jj.tolist(), strict=True))
    assert brute == [(i, 3000 + i) for i in range(300)]  # random 64-bit hashes never collide by chance
    assert sorted(sorted(g) for g in near_duplicate_groups(h.tolist(), max_bits=4)) == [
        list(p) for p in brute
    ]


@pytest.mark.slow
def test_doctor_on_hymenoptera_reports_the_placeholder_gif():
    r = diagnose(shared_data() / "hymenoptera_data")
    assert r.counts == {"train": {"ants": 124, "bees": 121}, "val": {"ants": 70, "bees": 83}}
    gif = "train/ants/imageNotFound.gif"
    assert by_path(r.converted, "how")[gif].startswith("palette without transparency")
    note = by_path(r.notes, "note")[gif]
    assert "GIF" in note and "placeholder" in note
    assert r.unusable == [] and r.formats == {"JPEG": 397, "GIF": 1}
