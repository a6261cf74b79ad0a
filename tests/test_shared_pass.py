"""auto's shared frozen pass: one forward pass fills the caches of every pilot that reads the
same backbone's features or prefix maps, with exactly the rows each pilot would compute itself."""

from __future__ import annotations

import numpy as np
import pytest
from bad_images import text_as_jpg
from test_auto import _fake_runner, speed

from headstart.data.layout import resolve_data
from headstart.features.cache import FeatureCache
from headstart.training.auto import search
from headstart.training.auto.candidates import RUN_OVERHEAD, Candidate, grid
from headstart.training.auto.costs import predict, stage_cost
from headstart.training.auto.profile import REFERENCE, DataProfile
from headstart.training.auto.shared_pass import warm
from headstart.training.options import TrainConfig
from headstart.training.run import run
from headstart.training.strategies import select

from conftest import TINY, make_class_tree

MAPS = {"strategy": "finetune", "cache_prefix": True}
PILOTS = [
    {"strategy": "extract"},
    {"strategy": "extract", "feature_blocks": 2},
    {"strategy": "linear-probe"},
    {"strategy": "finetune", "cache_prefix": True, "unfreeze": 1},
    {"strategy": "finetune", "cache_prefix": True, "unfreeze": 2},
    {"strategy": "finetune", "unfreeze": 2},  # on images: nothing cached, not served
]


def _configs(data, cache, out, **extra) -> list[TrainConfig]:
    base = TrainConfig(data=str(data), backbone=TINY, weights="none", cache_dir=str(cache), epochs=2,
                       batch_size=8, num_workers=0, lr=0.05, calibrate=False, overwrite=True)  # fmt: skip
    return [
        base.with_overrides({**o, **extra, "output": str(out / f"r{i}")}).resolved()
        for i, o in enumerate(PILOTS)
    ]


def _rows(cache_root) -> dict[tuple[str, str], np.ndarray]:
    """Every cached row of every cache folder, by (spec, image key), in float32."""
    rows = {}
    for spec in sorted(cache_root.glob("*/spec.json")):
        cache = FeatureCache(cache_root, spec.parent.name)
        keys = [k for (k,) in cache._db.execute("SELECT key FROM features")]
        found = cache.lookup(keys)
        spec_text = spec.read_text()
        dim = next(cache._map(s).shape[1] for s, _ in found.values())
        for k, (s, r) in found.items():
            rows[(spec_text, k)] = cache.read([(s, r)], dim)[0].astype(np.float32)
        cache.close()
    return rows


def test_one_pass_leaves_each_pilot_the_rows_it_would_compute_itself(tiny_split, tmp_path):
    split = resolve_data(str(tiny_split))
    shared = _configs(tiny_split, tmp_path / "shared", tmp_path / "a")
    passes = warm(shared, split)
    assert [p["served"] for p in passes] == [[0, 1, 2, 3, 4]] and passes[0]["images"] == 34
    by_itself = _configs(tiny_split, tmp_path / "alone", tmp_path / "b")
    for a, b in zip(shared, by_itself, strict=True):
        ra, rb = run(a).results, run(b).results
        if a.strategy != "finetune" or a.cache_prefix:  # each pilot found all it reads in the cache
            assert (ra.cache_hit_rate, ra.features_extracted) == (1.0, 0)
        assert (ra.val_accuracy, ra.val_loss) == (rb.val_accuracy, rb.val_loss)
    ours, theirs = _rows(tmp_path / "shared"), _rows(tmp_path / "alone")
    assert ours.keys() == theirs.keys() and len({spec for spec, _ in ours}) == 4  # features x2, maps x2
    for k in ours:  # float16 rows: the same, or one rounding step apart
        np.testing.assert_allclose(ours[k], theirs[k], rtol=2e-3, atol=1e-3)
    assert warm(shared, split)[0]["images"] == 0  # a second pass finds everything cached


def test_a_pilot_alone_on_its_engine_or_without_a_cache_is_not_served(tiny_split, tmp_path):
    split = resolve_data(str(tiny_split))
    cfgs = _configs(tiny_split, tmp_path / "c", tmp_path / "o")
    cfgs[3] = cfgs[3].with_overrides({"frozen_engine": "onnxruntime"})  # its rows are keyed by that engine
    cfgs[1] = cfgs[1].with_overrides({"cache": False})  # no cache to fill
    assert [p["served"] for p in warm(cfgs, split)] == [[0, 2, 4]]
    assert warm(cfgs[:1], split) == []  # one pilot alone computes its own


def test_the_time_model_prices_one_pass_for_the_pilots_that_share_it(tiny_split):
    split = resolve_data(str(tiny_split))
    cands = [
        Candidate("extract", "features", {"strategy": "extract"}, REFERENCE),
        Candidate("3 blocks", "features", {"strategy": "extract", "feature_blocks": 3}, REFERENCE),
        Candidate("ft1", "prefix", {**MAPS, "unfreeze": 1}, REFERENCE, groups=1),
        Candidate("ft2", "prefix", {**MAPS, "unfreeze": 2}, REFERENCE, groups=2),
    ]
    alone, sp = speed(), speed(shared_pass=True)
    extract = 34 / 100  # 34 images at 100 img/s (forward; decode is faster)
    each = stage_cost(cands, [split], alone, 2)
    once = stage_cost(cands, [split], sp, 2)
    assert each - once == pytest.approx(3 * extract - RUN_OVERHEAD)  # three passes fewer, one overhead more
    other = Candidate("ft2 at 128", "prefix", cands[3].options, 128, groups=2)  # another size: its own pass
    assert stage_cost([*cands, other], [split], sp, 2) - once == pytest.approx(
        stage_cost([other], [split], sp, 2), rel=1e-6
    )


def test_the_search_runs_the_shared_pass_before_its_pilots_and_records_it(tmp_path):
    make_class_tree(tmp_path / "d" / "train", per_class=40)
    make_class_tree(tmp_path / "d" / "val", per_class=10, seed=500)
    cfg = TrainConfig(data=str(tmp_path / "d"), strategy="auto", budget="10m").resolved()
    clock, seen, sp, calls = [0.0], [], speed(), []

    def fake_warm(cfgs, split):
        calls.append((cfgs, split))
        clock[0] += 1.0
        served = [i for i, c in enumerate(cfgs) if select(c).frozen_outputs is not None]
        images = len(split.train) + len(split.val)
        return [{"size": 224, "served": served, "images": images, "failed": 0, "seconds": 1.0}]

    run_ = _fake_runner(clock, sp, seen)
    plan = search.choose(cfg, run=run_, clock=lambda: clock[0], speed=sp, warm=fake_warm)
    pilots = plan.record["stages"][0]
    shared = pilots["shared_passes"][0]
    assert calls and calls[0][1] is seen[0]  # before the first pilot, on its images
    assert shared["actual_seconds"] == 1.0 and shared["predicted_seconds"] > 0
    assert "extract" in shared["served"] and not any("augmented" in n for n in shared["served"])
    assert {c.output for c in calls[0][0]} == {"unused"} and all(not c.calibrate for c in calls[0][0])
    assert (
        sp.shared_pass
        and predict(
            next(c for c in grid(DataProfile.of(seen[0]), sp) if c.name == "extract"),
            sp,
            seen[0],
            2,
        )
        < RUN_OVERHEAD + 0.1
    )  # the pilots are priced as cached once the pass ran


def test_a_broken_file_is_left_to_each_pilot_to_report(tiny_split, tmp_path):
    bad = tiny_split / "train" / "red" / "broken.png"
    text_as_jpg(bad)
    split = resolve_data(str(tiny_split))
    cfgs = _configs(tiny_split, tmp_path / "c", tmp_path / "o", max_bad_fraction=1.0)
    (p,) = warm(cfgs, split)
    assert (p["images"], p["failed"]) == (35, 1)
    r = run(cfgs[4]).results  # it tries the file again, reports it, and reads the rest from the cache
    assert [s["path"] for s in r.skipped_files] == [str(bad)]
    assert (r.features_extracted, r.features_from_cache) == (0, 34)


def test_on_onnx_runtime_one_exported_pass_serves_them_too(tiny_split, tmp_path):
    split = resolve_data(str(tiny_split))
    shared = _configs(tiny_split, tmp_path / "shared", tmp_path / "a", frozen_engine="onnxruntime")
    (p,) = warm(shared, split)
    assert (p["engine"], p["served"], p["images"]) == ("onnxruntime", [0, 1, 2, 3, 4], 34)
    alone = _configs(tiny_split, tmp_path / "alone", tmp_path / "b", frozen_engine="onnxruntime")
    for a, b in zip(shared[:5], alone[:5], strict=True):
        ra, rb = run(a).results, run(b).results
        assert (ra.cache_hit_rate, ra.features_extracted) == (1.0, 0)
        assert rb.frozen_engine["name"] == "onnxruntime"  # the rows are keyed by the engine: these match
        assert ra.val_loss == pytest.approx(rb.val_loss, abs=1e-4)
    ours, theirs = _rows(tmp_path / "shared"), _rows(tmp_path / "alone")
    assert ours.keys() == theirs.keys()
    for k in ours:
        np.testing.assert_allclose(ours[k], theirs[k], rtol=2e-3, atol=1e-3)
