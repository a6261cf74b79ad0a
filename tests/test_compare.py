"""headstart compare: one split, one seed, one row per strategy, md/csv/png written."""

from __future__ import annotations

import csv
import json

import pytest

from headstart.core.errors import ConfigError
from headstart.insight.compare import COLUMNS, compare

from conftest import TINY, run_cli


def test_compare_writes_table_per_strategy(tmp_path, tiny_split):
    res = compare(tiny_split, strategies=["scratch", "extract", "finetune", "linear-probe"],
                  backbones=[TINY], output=tmp_path / "cmp", epochs=1, weights="none", batch_size=8,
                  num_workers=0)  # fmt: skip
    out = tmp_path / "cmp"
    assert [r["strategy"] for r in res.rows] == ["scratch", "extract", "finetune", "linear-probe"]
    for f in ("compare.md", "compare.csv", "compare.png"):
        assert (out / f).stat().st_size > 100
    with open(out / "compare.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == COLUMNS and len(rows) == 4
    md = (out / "compare.md").read_text().splitlines()
    assert len(md) == 2 + 4 and all("|" in line for line in md)
    splits = set()
    for r in rows[:3]:
        assert r["status"] == "ok"
        run = out / f"timm_test_efficientnet-{r['strategy']}"
        results = json.loads((run / "results.json").read_text())
        assert float(r["val_accuracy"]) == round(results["val_accuracy"], 4)
        assert int(r["trainable_params"]) == results["trainable_params"]
        assert float(r["wall_seconds"]) > 0 and float(r["images_per_second"]) > 0
        splits.add((run / "split.json").read_text())
    assert len(splits) == 1  # the same train/val files for every strategy
    by = {r["strategy"]: r for r in rows}
    assert int(by["extract"]["trainable_params"]) < int(by["finetune"]["trainable_params"])
    assert int(by["finetune"]["trainable_params"]) < int(by["scratch"]["trainable_params"])
    assert by["scratch"]["epochs"] == "1" and by["finetune"]["epochs"] == "1"
    assert by["linear-probe"]["status"] == "ok"


def test_compare_rejects_unknown_strategy(tmp_path, tiny_split):
    with pytest.raises(ConfigError, match="finetuning"):
        compare(tiny_split, strategies=["finetuning"], output=tmp_path / "cmp")


@pytest.mark.slow
def test_compare_cli(tmp_path, tiny_split):
    r = run_cli("compare", tiny_split, "--strategies", "extract", "--backbones", TINY, "--weights", "none",
                "--workers", "0", "--image-size", "64", "--feature-blocks", "2",
                "-o", tmp_path / "cmp")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "| extract |" in r.stdout and (tmp_path / "cmp" / "compare.png").exists()
    record = json.loads(next((tmp_path / "cmp").glob("*-extract/model.json")).read_text())
    assert record["preprocessing"]["input_size"] == 64 and record["backbone"]["feature_blocks"] == 2
    r = run_cli("compare", tmp_path / "missing", "-o", tmp_path / "x")
    assert r.returncode == 2 and "headstart: error:" in r.stderr
