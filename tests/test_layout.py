"""One dataset scanner: train, doctor, evaluate and predict see the same files for the same reasons."""

from __future__ import annotations

import numpy as np
import pytest

from headstart.data.doctor import diagnose, format_report
from headstart.data.inspect import popcount
from headstart.data.layout import dataset_items, expand_inputs, resolve_data, scan_dataset

from conftest import make_class_tree


@pytest.fixture
def three_splits(tmp_path):
    """DATA/train, DATA/val and DATA/test, with strays beside and inside them."""
    root = tmp_path / "data"
    make_class_tree(root / "train", per_class=6)
    make_class_tree(root / "val", per_class=3, seed=100)
    make_class_tree(root / "test", per_class=2, seed=200)
    (root / "README.md").write_text("about")
    (root / "train" / "red" / ".DS_Store").write_bytes(b"\0")
    (root / "val" / "green" / "notes.txt").write_text("x")
    return root


def test_training_and_doctor_describe_the_same_layout(three_splits):
    layout = scan_dataset(three_splits)
    assert (layout.train, layout.val, list(layout.trees)) == ("train", "val", ["train", "val", "test"])
    split = resolve_data(three_splits)
    assert (len(split.train), len(split.val)) == (12, 6) and split.layout == "train/ + val/"
    reasons = {s.path.removeprefix(str(three_splits) + "/"): s.reason for s in split.skipped}
    assert reasons["README.md"] == "outside the split folders (ignored)"
    assert reasons["train/red/.DS_Store"] == "hidden or system file"
    assert reasons["val/green/notes.txt"] == "not an image file extension"
    assert reasons["test"].startswith("split folder not used by training")
    report = diagnose(three_splits, duplicates=False)
    assert report.layout == "train/ + val/ + test/"
    assert report.counts == {"train": {"green": 6, "red": 6}, "val": {"green": 3, "red": 3},
                             "test": {"green": 2, "red": 2}}  # fmt: skip
    stray = {s["path"]: s["reason"] for s in report.stray}
    for path in ("README.md", "train/red/.DS_Store", "val/green/notes.txt"):
        assert stray[path] == reasons[path]  # the same reason, from the same scan


def test_evaluate_and_predict_walk_folders_with_the_same_rule(three_splits):
    items = dataset_items(three_splits, ["green", "red"])  # a train/val folder: its val split
    assert len(items) == 6 and all("/val/" in p for p, _ in items)
    paths, skipped = expand_inputs([three_splits / "train"])
    assert len(paths) == 12 and [s.reason for s in skipped] == ["hidden or system file"]
    with pytest.raises(Exception, match="not trained on"):
        dataset_items(three_splits, ["red", "blue"])


def test_doctor_tiny_threshold_follows_tiny_fraction(three_splits):
    report = diagnose(three_splits, input_size=224, tiny_fraction=0.1, duplicates=False)
    assert report.min_side == 22 and report.tiny == []  # the 40 px images are not tiny at 10 %
    assert "short side < 22 px for 224 px input" in format_report(report)
    report = diagnose(three_splits, input_size=224, duplicates=False)
    assert report.min_side == 112 and len(report.tiny) == 12 + 6 + 4  # every image
    assert "short side < 112 px" in format_report(report)


def test_popcount_matches_numpy_2_and_its_fallback(monkeypatch):
    x = np.random.default_rng(0).integers(0, 2**63, 200, dtype=np.uint64) * np.uint64(3)
    expected = np.array([bin(int(v)).count("1") for v in x])
    assert (popcount(x) == expected).all()
    monkeypatch.delattr(np, "bitwise_count", raising=False)  # NumPy 1.x has no bitwise_count
    assert (popcount(x) == expected).all() and (popcount(x.reshape(20, 10)) == expected.reshape(20, 10)).all()
