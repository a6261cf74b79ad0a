"""--strategy auto: the time model, the budget (on a fake clock), selection that never reads the
validation split, and a plan that survives --resume."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import pytest

import headstart
from headstart.core.errors import ConfigError
from headstart.data.layout import DataSplit, resolve_data
from headstart.training.auto import scoring, search
from headstart.training.auto.budget import Budget, parse_duration
from headstart.training.auto.candidates import BASE, REFERENCE, Candidate, grid, learn, seconds, sizes_for
from headstart.training.auto.costs import predict
from headstart.training.auto.pilots import Runners
from headstart.training.auto.preview import preview
from headstart.training.auto.profile import DataProfile, Speed
from headstart.training.auto.splits import folds, subset
from headstart.training.options import TrainConfig
from headstart.training.record import RunResults, TrainResult

from conftest import TINY, make_class_tree


def speed(**kw) -> Speed:
    """A machine with round numbers: 100 img/s forward at 224 px, 500 decode, etc."""
    s = Speed(
        "cpu",
        2,
        1,
        decode=500.0,
        forward={"efficientnet_lite0": 100.0, TINY: 100.0},
        suffix_train={1: 400.0, 2: 200.0, 3: 100.0},
        image_train={1: 60.0, 2: 50.0, 3: 40.0},
        full_train=25.0,
    )
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def test_time_model_on_synthetic_speeds():
    sp = speed()
    features = Candidate("extract", "features", {"strategy": "extract"}, REFERENCE)
    # 1000 + 200 images at min(100 forward, 500 decode) img/s, 30 head epochs, 3 s of overhead
    assert seconds(features, sp, n=1000, m=200, epochs=0) == pytest.approx(3 + 12 + 30 * 1200 / 1e5)
    assert seconds(features, sp, n=1000, m=200, epochs=0, cached=0.5) == pytest.approx(3 + 6 + 0.36)
    prefix = Candidate("p", "prefix", {"strategy": "finetune"}, 112, groups=2)  # a quarter of the pixels
    # prefix maps at 400 img/s, then 4 epochs of 1000 at 800 img/s and 200 at 2400 img/s
    assert seconds(prefix, sp, n=1000, m=200, epochs=4) == pytest.approx(
        3 + 1200 / 400 + 4 * (1000 / 800 + 200 / 2400)
    )
    images = Candidate("i", "images", {"strategy": "finetune"}, REFERENCE, groups=2)
    assert seconds(images, sp, n=1000, m=200, epochs=2) == pytest.approx(3 + 2 * (1000 / 50 + 200 / 100))
    full = Candidate("f", "images", {"strategy": "full"}, REFERENCE)  # every layer trains: 25 img/s
    assert seconds(full, sp, n=1000, m=200, epochs=2) == pytest.approx(3 + 2 * (1000 / 25 + 200 / 100))
    slow_disk = speed(decode=25.0)  # decoding, not the model, is the bottleneck
    assert seconds(images, slow_disk, n=1000, m=200, epochs=2) == pytest.approx(
        3 + 2 * (1000 / 25 + 200 / 25)
    )
    assert sizes_for(DataProfile(1, 1, 2, 1, 32)) == [128, 192]
    assert sizes_for(DataProfile(1, 1, 2, 1, 500)) == [224]


def test_frozen_work_is_priced_on_the_engine_that_runs_it():
    ort = speed(engine="onnxruntime", engine_forward={"efficientnet_lite0": 300.0}, export_seconds=6.0)
    features = Candidate("extract", "features", {"strategy": "extract"}, REFERENCE)
    # 1000 + 200 images: ONNX Runtime at min(300, 500 decode) img/s plus one export
    assert seconds(features, ort, n=1000, m=200, epochs=0) == pytest.approx(3 + 6 + 1200 / 300 + 0.36)
    prefix = Candidate("p", "prefix", {"strategy": "finetune"}, 112, groups=2)
    assert seconds(prefix, ort, n=1000, m=200, epochs=4) == pytest.approx(
        3 + 6 + 1200 / 500 + 4 * (1000 / 800 + 200 / 2400)  # 1200 img/s at 112 px: decoding bounds it
    )
    # the search's share too: 1,000 + 1,000 images take 40 s at 50 img/s in PyTorch, over a tenth of
    # a 5-minute budget (the final run needs the time), but 6 + 2000/300 s on ONNX Runtime
    items = [(f"{i}.jpg", i % 10) for i in range(1000)]
    split = DataSplit([str(c) for c in range(10)], items, items, "folders")
    slow = {"efficientnet_lite0": 50.0}
    assert search.search_share(speed(forward=slow), split, 300) == 0.3
    assert search.search_share(dataclasses.replace(ort, forward=slow), split, 300) == search.SEARCH_SHARE
    # below the engine's threshold, and for a cache that holds everything, PyTorch's numbers as before
    small = dict(n=500, m=100, epochs=0)
    assert seconds(features, ort, **small) == seconds(features, speed(), **small)
    assert seconds(features, ort, n=1000, m=200, epochs=0, cached=1.0) == pytest.approx(3 + 0.36)
    # fine-tuning on images: the frozen prefix runs on the engine (features/live_prefix.py). Its
    # share of a step, 1/50 - 1/200 s per image, shrinks 3x (300 vs 100 img/s forward): 100 img/s
    # training; validation: the suffix's forward (1/600 s) plus the rest of 1/100 s, 3x faster,
    # 225 img/s; one export; 2 epochs of 1,200 images pass the threshold
    images = Candidate("i", "images", {"strategy": "finetune"}, REFERENCE, groups=2)
    expected = 3 + 6 + 2 * (1000 / 100 + 200 / 225)
    assert seconds(images, ort, n=1000, m=200, epochs=2) == pytest.approx(expected)
    few = dict(n=300, m=100, epochs=2)  # 800 passes: PyTorch's fast path, priced as measured
    assert seconds(images, ort, **few) == seconds(images, speed(), **few)
    full = Candidate("f", "images", {"strategy": "full"}, REFERENCE)  # nothing frozen to move
    assert seconds(full, ort, n=1000, m=200, epochs=2) == seconds(full, speed(), n=1000, m=200, epochs=2)


def test_durations():
    assert (parse_duration("10m"), parse_duration("1h30m"), parse_duration("90s"), parse_duration(120)) == (
        600,
        5400,
        90,
        120,
    )
    for bad in ("ten minutes", "10x", "1h30", "5"):
        with pytest.raises(ConfigError, match="--budget"):
            parse_duration(bad)


def test_final_run_fits_what_is_left_on_a_subset_if_it_must():
    sp = speed()
    big = DataProfile(num_train=50_000, num_val=10_000, classes=10, smallest_class=5000, short_side=32)
    split = DataSplit([str(i) for i in range(10)], [(f"t{i}", i % 10) for i in range(50_000)],
                      [(f"v{i}", i % 10) for i in range(10_000)], "synthetic")  # fmt: skip
    prefix = next(c for c in grid(big, sp) if c.kind == "prefix")
    clock = [0.0]
    budget = Budget(3600, lambda: clock[0])
    cfg = TrainConfig(data="d", strategy="auto")
    f = search.final_config(cfg, prefix, sp, split, budget)
    assert f.seconds <= search.SAFETY * 3600 and f.train_images == 50_000 and f.config.epochs >= 2
    clock[0] = 3500  # nearly spent: fewer images rather than a run that overshoots
    f = search.final_config(cfg, prefix, sp, split, budget)
    assert f.train_images < 50_000 and f.seconds <= search.SAFETY * 100 + 1e-6 or f.train_images <= 100


def _fake_runner(clock: list[float], sp: Speed, seen: list, slow: float = 1.2):
    """Trains nothing: advances the fake clock by 1.2x the predicted time (what the cache holds
    included) and scores the recipe by a deterministic function of its name and of the labels of
    the images it was given."""

    def run(cfg, *, split):
        seen.append(split)
        _advance(clock, sp, cfg, split, slow)
        labels = sum(y for _, y in split.val) + sum(y for _, y in split.train)
        acc = (hash((cfg.strategy, cfg.unfreeze, cfg.image_size, cfg.feature_blocks, labels)) % 1000) / 1000
        return TrainResult(split.root, RunResults(val_accuracy=acc, val_loss=1 - acc), [])

    return run


def _advance(clock: list[float], sp: Speed, cfg, split: DataSplit, slow: float = 1.0) -> None:
    """Advance the fake clock by `slow` x the time `cfg`'s run on `split` takes on the measured
    speeds, whatever the search has learnt of the machine so far."""
    images = cfg.strategy in ("finetune", "full")
    kind = "prefix" if cfg.cache_prefix else "images" if images else "features"
    options = {"strategy": cfg.strategy, "feature_blocks": cfg.feature_blocks, "tta": cfg.tta}
    c = Candidate("x", kind, options, cfg.image_size or REFERENCE, cfg.backbone,
                  groups=cfg.unfreeze if cfg.strategy == "finetune" else 0)  # fmt: skip
    clock[0] += slow * predict(c, dataclasses.replace(sp, correction={}), split, cfg.epochs)


@pytest.mark.parametrize("budget", ["2m", "10m", "1h"])
def test_the_search_leaves_the_final_run_its_time_on_a_fake_clock(tmp_path, budget):
    make_class_tree(tmp_path / "d" / "train", per_class=60)
    make_class_tree(tmp_path / "d" / "val", per_class=10, seed=500)
    clock, seen, sp = [0.0], [], speed()
    cfg = TrainConfig(data=str(tmp_path / "d"), strategy="auto", budget=budget).resolved()
    plan = search.choose(cfg, run=_fake_runner(clock, sp, seen), clock=lambda: clock[0], speed=sp)
    seconds_total = parse_duration(budget)
    searched = clock[0]
    final = plan.record["final"]["predicted_seconds"]
    assert searched <= 1.2 * search.SEARCH_SHARE * seconds_total + 1  # pilots ran 20 % slower than predicted
    assert searched + final <= seconds_total
    for stage in plan.record["stages"]:  # 20 % slower than measured, corrected from its first run on
        assert stage["actual_seconds"] <= 1.2 * stage["predicted_seconds"] + 1
    # learnt: 1.2, a little more on short runs (the fake clock slows the fixed overhead too)
    assert sp.correction and all(1.2 <= f <= 1.4 for f in sp.correction.values())
    assert plan.deadline == pytest.approx(seconds_total)


def test_the_time_model_learns_from_every_run_the_long_ones_most():
    sp = speed()
    learn(sp, "prefix", 13.0, 15.0)  # a short cold pilot: 12 s for 10 predicted, past the 3 s overhead
    assert sp.correction["prefix"] == pytest.approx(1.2)
    learn(sp, "prefix", 3 + 1.2 * 100, 3 + 80)  # predicted with 1.2; it took 80 for 100
    assert sp.correction["prefix"] == pytest.approx((12 + 80) / (10 + 100))  # not 1.2, nor 0.8
    learn(sp, "prefix", 4.0, 40.0)  # too short to tell the model from the overhead: ignored
    assert sp.correction["prefix"] == pytest.approx(92 / 110)
    learn(sp, "features", 3 + 100, 3 + 1000)
    assert sp.correction == {"prefix": pytest.approx(92 / 110), "features": 4.0}  # kinds apart, clamped
    assert "observed" not in sp.to_dict() and sp.to_dict()["correction"] == sp.correction


def test_selection_never_reads_the_validation_split(tmp_path):
    """No validation image reaches any pilot; poisoning the validation labels changes no choice."""
    make_class_tree(tmp_path / "d" / "train", classes=("red", "green", "blue"), per_class=30)
    make_class_tree(tmp_path / "d" / "val", classes=("red", "green", "blue"), per_class=10, seed=500)
    cfg = TrainConfig(data=str(tmp_path / "d"), strategy="auto", budget="10m").resolved()
    val = {p for p, _ in resolve_data(cfg.data).val}
    plans = []
    for poisoned in (False, True):
        if poisoned:  # swap two validation class folders: every validation label is now wrong
            v = tmp_path / "d" / "val"
            (v / "red").rename(v / "tmp")
            (v / "green").rename(v / "red")
            (v / "tmp").rename(v / "green")
        clock, seen = [0.0], []
        plans.append(
            search.choose(
                cfg, run=_fake_runner(clock, speed(), seen), clock=lambda clock=clock: clock[0], speed=speed()
            )
        )
        assert seen and not any(p in val for s in seen for p, _ in s.train + s.val)
    strip = lambda r: [[(c["name"], c["accuracy"]) for c in s["candidates"]] for s in r["stages"]]  # noqa: E731
    assert plans[0].record["chosen"] == plans[1].record["chosen"]
    assert strip(plans[0].record) == strip(plans[1].record)


def test_auto_trains_the_chosen_recipe_and_the_plan_survives_resume(tiny_split, tmp_path, monkeypatch):
    from headstart.training import loop

    real = loop.LoopState.end_epoch

    class Crash(Exception):
        pass

    def crash_after_first_final_epoch(self, epoch, *a, **k):
        stop = real(self, epoch, *a, **k)
        if self.run.plan is not None and epoch == 1 and self.run.cfg.epochs > 1:
            raise Crash  # a power cut after the first epoch of the final run (its checkpoint is saved)
        return stop

    monkeypatch.setattr(loop.LoopState, "end_epoch", crash_after_first_final_epoch)
    out = tmp_path / "run"
    opts = dict(backbone=TINY, weights="none", strategy="auto", budget="3m", num_workers=0, batch_size=8)
    try:
        r = headstart.train(tiny_split, output=out, **opts)
        crashed = False
    except Crash:
        crashed = True
    plan = json.loads((out / "plan.json").read_text())
    options = json.loads((out / "config.json").read_text())["options"]
    assert options["strategy"] != "auto" and options["strategy"] == plan["final"]["options"]["strategy"]
    assert options["keep_epoch"] == "last"  # the final run's epoch is not chosen on the validation split
    assert plan["stages"] and plan["chosen"] and plan["budget_seconds"] == 180
    if crashed:  # the chosen recipe trains several epochs: resume it
        monkeypatch.undo()
        r = headstart.resume(out)
    assert r.results.plan["chosen"] == plan["chosen"] and r.results.plan["stages"] == plan["stages"]
    assert r.results.plan["final"]["actual_seconds"] > 0 and r.results.frozen_tensors_changed == 0
    assert r.results.best_epoch == r.results.epochs_run
    assert json.loads((out / "status.json").read_text())["state"] == "finished"


def test_recipe_options_that_auto_chooses_itself_are_named(tmp_path, caplog):
    """`headstart train DATA --epochs 20` (auto by default) says that 20 is not used, and how to use it."""
    cfg = TrainConfig(data=str(tmp_path), strategy="auto", epochs=20, unfreeze=3).resolved()
    assert search.options_auto_chooses(cfg) == ["epochs", "unfreeze"]
    stops = TrainConfig(data=str(tmp_path), strategy="auto", patience=3).resolved()
    assert search.options_auto_chooses(stops) == ["patience"]  # the final run keeps its last epoch
    plain = TrainConfig(data=str(tmp_path), strategy="auto", label_smoothing=0.1).resolved()
    assert search.options_auto_chooses(plain) == []  # training options auto does not search are kept
    with pytest.raises(headstart.DataError), caplog.at_level("WARNING", logger="headstart"):
        search.choose(cfg, run=None, speed=speed())  # an empty folder fails after the warning
    assert "auto chooses epochs, unfreeze itself" in caplog.text and "--strategy extract" in caplog.text


def test_full_fine_tuning_is_a_candidate_where_its_speed_was_measured():
    photos = DataProfile(num_train=1000, num_val=200, classes=5, smallest_class=200, short_side=500)
    full = [c for c in grid(photos, speed()) if c.options["strategy"] == "full"]
    assert [(c.name, c.kind, c.options) for c in full] == [
        (
            "full fine-tuning, augmented, 224px",
            "images",
            {"strategy": "full", "image_size": 224, "tta": "hflip"},
        )
    ]
    assert not [c for c in grid(photos, speed(full_train=0.0)) if c.options["strategy"] == "full"]


def test_larger_backbones_are_fine_tuned_on_cached_maps_where_their_speed_there_was_measured():
    cifar = DataProfile(num_train=50_000, num_val=10_000, classes=10, smallest_class=5000, short_side=32)
    forward = {"efficientnet_lite0": 100.0, "efficientnet_lite1": 80.0, "efficientnet_lite2": 60.0}
    assert not [c for c in grid(cifar, speed(forward=forward)) if c.kind == "prefix" and c.backbone != BASE]
    sp = speed(forward=forward, larger_suffix={"efficientnet_lite2": 50.0})
    (lite2,) = [c for c in grid(cifar, sp) if c.kind == "prefix" and c.backbone != BASE]
    assert lite2.name == "finetune 2 groups of efficientnet_lite2 on cached maps, 192px, backbone lr x1"
    assert lite2.options["backbone"] == "efficientnet_lite2" and lite2.options["unfreeze"] == 2
    assert TrainConfig(data="d", **lite2.options).resolved().backbone == "efficientnet_lite2"
    # priced at its own rate (50 img/s at 224 px), not lite0's 2-group rate (200)
    px = (192 / REFERENCE) ** 2
    maps = (1000 + 2 * 200) / (60 / px)  # its frozen prefix at its forward rate; the val mirrors too
    assert seconds(lite2, sp, n=1000, m=200, epochs=2) == pytest.approx(
        3 + maps + 2 * (1000 / (50 / px) + 400 / (3 * 50 / px))
    )
    lite0 = next(c for c in grid(cifar, sp) if c.name == lite2.name.replace(" of efficientnet_lite2", ""))
    assert seconds(lite0, sp, n=1000, m=200, epochs=2) < seconds(lite2, sp, n=1000, m=200, epochs=2)


def test_on_one_split_the_larger_second_stage_decides_not_the_pilots():
    """What 5,000 CIFAR-10 images did: on 120 pilot images plain features led (0.645 vs 0.61), on
    2,000 in the second stage the three-block features did (0.791 vs 0.766). The mean of both
    stages picked the first."""
    items = [(f"{i}.jpg", i % 10) for i in range(5000)]
    split = DataSplit([str(c) for c in range(10)], items[:4000], items[4000:], "folders")
    cands = [c for c in grid(DataProfile(4000, 1000, 10, 400, 32), speed()) if c.kind == "features"][:2]
    table = {1: (0.645, 0.766), 3: (0.61, 0.791)}  # feature blocks -> (accuracy on the pilots, on more)

    seen: list[int] = []

    def run(cfg, split):
        acc = table[cfg.feature_blocks][seen.count(cfg.feature_blocks)]
        seen.append(cfg.feature_blocks)
        return TrainResult("", RunResults(val_accuracy=acc, val_loss=1 - acc), [])

    cfg = TrainConfig(data="d", strategy="auto", budget="10m").resolved()
    budget, record = Budget(600, lambda: 0.0), {"stages": []}
    winner = search.halving(cfg, cands, split, speed(decode=20.0), budget, record, Runners(run))
    assert record["folds"] == 1 and [len(s["candidates"]) for s in record["stages"]] == [2, 2]
    assert winner.name == "extract, 3 blocks"


@pytest.mark.parametrize("weights", ["none", "balanced"])
def test_balanced_class_weights_rank_candidates_by_balanced_accuracy(weights):
    """Where the user weights the classes, a recipe that neglects a rare class must not win on
    accuracy over the common ones: the pilots are ranked by the mean recall over the classes."""
    items = [(f"{i}.jpg", i % 10) for i in range(5000)]
    split = DataSplit([str(c) for c in range(10)], items[:4000], items[4000:], "folders")
    cands = [c for c in grid(DataProfile(4000, 1000, 10, 400, 32), speed()) if c.kind == "features"][:2]
    table = {1: (0.80, 0.60), 3: (0.78, 0.75)}  # feature blocks -> (accuracy, balanced accuracy)

    def run(cfg, split):
        acc, bal = table[cfg.feature_blocks]
        return TrainResult("", RunResults(val_accuracy=acc, val_balanced_accuracy=bal, val_loss=0.5), [])

    cfg = TrainConfig(data="d", strategy="auto", budget="10m", class_weights=weights).resolved()
    record = {"stages": []}
    winner = search.halving(
        cfg, cands, split, speed(decode=20.0), Budget(600, lambda: 0.0), record, Runners(run)
    )
    assert winner.name == ("extract, 3 blocks" if weights == "balanced" else "extract")
    entry = record["stages"][0]["candidates"][0]
    assert entry["score"] == (entry["balanced_accuracy"] if weights == "balanced" else entry["accuracy"])


def test_a_recipe_that_fails_is_recorded_and_never_wins():
    """A recipe that does not apply here (e.g. a backbone that cannot be split) is logged with its
    error and no scores; the search goes on with the others."""
    items = [(f"{i}.jpg", i % 10) for i in range(5000)]
    split = DataSplit([str(c) for c in range(10)], items[:4000], items[4000:], "folders")
    cands = [c for c in grid(DataProfile(4000, 1000, 10, 400, 32), speed()) if c.kind == "features"][:2]

    def run(cfg, split):
        if cfg.feature_blocks == 1:
            raise ConfigError("this recipe does not apply here")
        return TrainResult("", RunResults(val_accuracy=0.5, val_balanced_accuracy=0.5, val_loss=1.0), [])

    cfg = TrainConfig(data="d", strategy="auto", budget="10m").resolved()
    record = {"stages": []}
    winner = search.halving(
        cfg, cands, split, speed(decode=20.0), Budget(600, lambda: 0.0), record, Runners(run)
    )
    assert winner.name == "extract, 3 blocks"
    failed = next(e for e in record["stages"][0]["candidates"] if e["name"] == "extract")
    assert failed["score"] is None and failed["accuracy"] is None and "does not apply" in failed["error"]


def test_rates_are_timed_longer_where_the_budget_can_pay_for_it(monkeypatch):
    # a misread rate moves the whole plan; 2 s a rate cuts the spread between readings, and costs
    # about 16 s on CIFAR-10, too much for a 2-minute budget, little for an hour
    timed = []
    monkeypatch.setattr(search, "measure", lambda split, backbones, **kw: timed.append(kw["min_seconds"]))
    split = DataSplit(["a"], [("x.jpg", 0)] * 3000, [("v.jpg", 0)], "folders")
    for budget in (120, 300, 600, 3600):
        search.measure_for(TrainConfig(data="d", strategy="auto"), split, Budget(budget, lambda: 0.0))
    assert timed == pytest.approx([0.6, 300 / 360, 600 / 360, 2.0])
    # small data (the ant/bee photos: 398 images): the whole run is short, so measuring stays short
    small = DataSplit(["a"], [("x.jpg", 0)] * 800, [("v.jpg", 0)] * 100, "folders")
    search.measure_for(TrainConfig(data="d", strategy="auto"), small, Budget(3600, lambda: 0.0))
    assert timed[-1] == 0.6


def test_lite1_is_measured_for_small_data_lite2_and_full_for_long_budgets_only(monkeypatch):
    calls = []
    monkeypatch.setattr(
        search,
        "measure",
        lambda split, backbones, **kw: calls.append((backbones, kw["full"] and kw["larger_groups"])),
    )
    cfg = TrainConfig(data="d", strategy="auto")
    small, large = (DataSplit(["a"], [("x.jpg", 0)] * n, [("v.jpg", 0)], "folders") for n in (2000, 3000))
    for split, seconds_ in ((small, 600), (large, 600), (large, search.LONG_BUDGET)):
        search.measure_for(cfg, split, Budget(seconds_, lambda: 0.0))
    # lite1 where the pilots see whole folds (its features are cheap and beat lite0's on held-out
    # ant/bee splits); on large data only with the long budgets, like lite2
    assert calls == [
        (["efficientnet_lite0", "efficientnet_lite1"], False),
        (["efficientnet_lite0"], False),
        (["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"], 2),  # and their maps' training
    ]
    calls.clear()  # another backbone, or your own weights: only that one is measured
    for other in (TrainConfig(data="d", strategy="auto", backbone="efficientnet_lite1"),
                  TrainConfig(data="d", strategy="auto", weights="w.safetensors")):  # fmt: skip
        search.measure_for(other, small, Budget(600, lambda: 0.0))
    assert calls == [(["efficientnet_lite1"], False), (["efficientnet_lite0"], False)]


def test_a_short_budget_pilots_fewer_recipes_of_every_kind_and_says_which_it_left_out(tmp_path, caplog):
    make_class_tree(tmp_path / "d" / "train", per_class=40)
    make_class_tree(tmp_path / "d" / "val", per_class=10, seed=500)
    clock, seen, sp = [0.0], [], speed(full_train=0.5)  # full fine-tuning cannot fit at all
    cfg = TrainConfig(data=str(tmp_path / "d"), strategy="auto", budget="45s").resolved()
    fake, configs = _fake_runner(clock, sp, seen), []

    def run(cfg, *, split):
        configs.append(cfg)
        return fake(cfg, split=split)

    with caplog.at_level("INFO", logger="headstart"):
        plan = search.choose(cfg, run=run, clock=lambda: clock[0], speed=sp)
    # the limit on broken files is the final run's, on all the data: a pilot's subset may hold more
    assert configs and all(c.max_bad_fraction == 1.0 for c in configs)
    left_out = plan.record["left_out_for_time"]
    piloted = {c["name"] for c in plan.record["stages"][0]["candidates"]}
    assert left_out and len(piloted) >= 2 and not piloted & set(left_out)
    everything = {c.name: c for c in grid(DataProfile.of(resolve_data(cfg.data)), sp)}
    assert plan.record["unaffordable"] == ["full fine-tuning, augmented, 192px"]
    assert piloted | set(left_out) | set(plan.record["unaffordable"]) == set(everything)
    kinds = Counter(search._family(everything[name]) for name in piloted)
    for name in left_out:  # the most numerous family gave way: none was left out below the others
        assert kinds[search._family(everything[name])] + 1 >= max(kinds.values())
    assert "candidates left out to fit the budget" in caplog.text
    assert clock[0] + plan.record["final"]["predicted_seconds"] <= 45


@pytest.mark.parametrize("budget", ["45s", "10m"])
def test_plan_previews_every_candidate_and_the_pilots_a_budget_allows(tmp_path, budget):
    make_class_tree(tmp_path / "d" / "train", per_class=40)
    make_class_tree(tmp_path / "d" / "val", per_class=10, seed=500)
    sp = speed(full_train=0.05)  # full fine-tuning fits neither budget
    cfg = TrainConfig(data=str(tmp_path / "d"), strategy="auto", budget=budget).resolved()
    p = preview(cfg, speed=sp)
    rows = {r["name"]: r for r in p["candidates"]}
    assert set(rows) == {c.name for c in grid(DataProfile.of(resolve_data(cfg.data)), sp)}
    assert not rows["full fine-tuning, augmented, 192px"]["affordable"]
    piloted = [r for r in rows.values() if r["piloted"]]
    assert all(r["pilot_seconds"] > 0 for r in piloted) and len(piloted) >= 2
    assert all(r["pilot_seconds"] is None for r in rows.values() if not r["piloted"])
    left_out = [r for r in rows.values() if r["affordable"] and not r["piloted"]]
    assert bool(left_out) == (budget == "45s")  # the same candidates `train` would leave out
    assert p["pilot_seconds"] <= 0.5 * search.SEARCH_SHARE * parse_duration(budget)
    # the stage: one frozen pass for the pilots that share it, then each pilot reading the cache
    each = sum(r["pilot_seconds"] for r in piloted)
    assert p["pilot_seconds"] == pytest.approx(p["shared_pass_seconds"] + each, abs=0.1 * len(piloted))
    assert (p["shared_pass_seconds"] > 0) == (budget == "10m")
    assert p["selected_by"] == "accuracy"


def test_pilots_see_enough_images_and_the_most_numerous_kind_makes_way():
    """5,000 CIFAR-10 images, 10m, on a slow box: every candidate piloted on 96 training images,
    where fine-tuning had too few steps to show anything (0.425 against 0.645 for features; on
    1,000 images it scored 0.755 against 0.714). Now candidates of the most numerous kind make way."""
    items = [(f"{i}.jpg", i % 10) for i in range(5000)]
    split = DataSplit([str(c) for c in range(10)], items, [], "folders")
    parts = folds(split, 0, 1)
    sp = speed(forward={"efficientnet_lite0": 100.0, "efficientnet_lite1": 70.0})
    cands = grid(DataProfile(5000, 1000, 10, 500, 32), sp)
    assert "extract efficientnet_lite1" in [c.name for c in cands]
    floor = search.pilot_floor(parts[0], 10)
    assert floor == search.PILOT_FLOOR == 500
    at_floor = [predict(c, sp, subset(parts[0], floor, 250, 0), 2) for c in cands]
    allowed = 0.6 * sum(at_floor)
    alive, subs, cost = search.pilots_that_fit(cands, parts, sp, 2, allowed, 0, floor)
    assert len(subs[0].train) >= floor and cost <= allowed and 2 <= len(alive) < len(cands)
    kinds = Counter(search._family(c) for c in alive)
    assert set(kinds) == {search._family(c) for c in cands}  # every family still pilots: lite1 too
    assert all(kinds[search._family(c)] + 1 >= max(kinds.values()) for c in cands if c not in alive)
    # half of them do not fit on 500 (a slow machine): that half pilots on fewer images
    half, fewer, _ = search.pilots_that_fit(cands, parts, sp, 2, 0.3 * sum(at_floor), 0, floor)
    assert len(half) == (len(cands) + 1) // 2 and len(fewer[0].train) < floor
    assert {search._family(c) for c in half} == {search._family(c) for c in cands}
    # nor below 10 per class where that is the search's least: more give way instead (down to two)
    few, per_class, _ = search.pilots_that_fit(cands, parts, sp, 2, 0.1 * sum(at_floor), 0, floor, 100)
    assert len(per_class[0].train) >= 100 and 2 <= len(few) < len(half)
    assert search.pilots_that_fit(cands, parts, sp, 2, 1.0, 0, floor, 100)[1] is None  # no pilots
    everyone, small, _ = search.pilots_that_fit(cands, parts, sp, 2, allowed, 0)  # no floor: as before
    assert everyone == cands and len(small[0].train) < floor
    # fewer images than the floor: all of them; many classes: 10 per class
    assert search.pilot_floor(dataclasses.replace(parts[0], train=items[:300]), 10) == 300
    assert search.pilot_floor(parts[0], 100) == 1000


def test_the_second_stage_gets_what_the_pilots_left_of_the_search_share():
    """Pilots that cost less than their half leave the rest to the survivors: more images there."""
    items = [(f"{i}.jpg", i % 10) for i in range(40_000)]
    split = DataSplit([str(c) for c in range(10)], items, [], "folders")
    sp = speed()
    cands = [c for c in grid(DataProfile(40_000, 0, 10, 4000, 32), sp) if c.kind == "features"][:2]

    def run(cfg, split):  # instant: the pilots spend nothing of the fake clock
        return TrainResult("", RunResults(val_accuracy=0.5, val_loss=0.5), [])

    cfg = TrainConfig(data="d", strategy="auto", budget="10m").resolved()
    budget, record = Budget(600, lambda: 0.0), {"stages": []}
    search.halving(cfg, cands, split, sp, budget, record, Runners(run))
    share = search.search_share(sp, split, 600) * 600
    pilots, survivors = record["stages"]
    assert pilots["predicted_seconds"] <= 0.5 * share < survivors["predicted_seconds"] <= share


def _scripted(table: dict, clock: list[float], step: float = 0.0):
    """A runner that trains nothing: the n-th run of a recipe scores table[recipe][n]; each run
    advances the fake clock by `step` seconds."""
    seen: list = []

    def run(cfg, split):
        clock[0] += step
        key = "prefix" if cfg.cache_prefix else f"{cfg.strategy} {cfg.feature_blocks}"
        acc = table[key][min(seen.count(key), len(table[key]) - 1)]
        seen.append(key)
        return TrainResult("", RunResults(val_accuracy=acc, val_loss=1 - acc), [])

    return run


@pytest.mark.parametrize("step", [200.0, 500.0])
def test_a_second_look_lets_fine_tuning_rank_on_more_images_where_the_final_leaves_time(step):
    """Pilots on part of the data favour features; where the features' final run leaves the time,
    they and the best fine-tuning pilot run again on more images, and the higher there trains."""
    items = [(f"{i}.jpg", i % 10) for i in range(20_000)]
    split = DataSplit([str(c) for c in range(10)], items[:16_000], items[16_000:], "folders")
    profile, sp = DataProfile(16_000, 4000, 10, 1600, 32), speed(forward={"efficientnet_lite0": 20.0})
    feats = [c for c in grid(profile, sp) if c.kind == "features"]
    cands = [*feats, next(c for c in grid(profile, sp) if c.kind == "prefix")]
    table = {"extract 1": (0.70, 0.75, 0.76), "extract 3": (0.69, 0.74), "linear-probe 1": (0.6,),
             "prefix": (0.5, 0.8)}  # fmt: skip
    cfg = TrainConfig(data="d", strategy="auto", budget="1h").resolved()
    record, clock = {"stages": []}, [0.0]
    run = _scripted(table, clock, step)
    winner = search.halving(cfg, cands, split, sp, Budget(3600, lambda: clock[0]), record, Runners(run))
    names = [s["name"] for s in record["stages"]]
    assert [len(s["candidates"]) for s in record["stages"][:2]] == [4, 2]
    if step == 200:  # 1,200 s of a 3,600-s budget spent on the search: time for a look
        assert names == ["pilots", "survivors", "second look"] and winner.kind == "prefix"
        look, survivors = record["stages"][2], record["stages"][1]
        assert [c["name"] for c in look["candidates"]] == ["extract", winner.name]
        assert look["train_images"] > survivors["train_images"]
        # as the final runs would train: the fine-tuning more epochs than the 3 it once had here
        assert look["epochs"]["extract"] == 30 and 3 < look["epochs"][winner.name] <= 10
    else:  # the search took 3,000 s: no time for a look besides the final run
        assert "second look" not in names and winner.name == "extract"


@pytest.mark.parametrize("budget", [3600, 36_000])
def test_the_second_stage_trains_survivors_as_their_final_runs_would(budget):
    """The second stage is the final run in miniature: each survivor trains the epochs its final
    run would, on as many images as the pilots saw or more. A recipe twice as slow per epoch
    trains fewer there, as in the final run: at equal epochs it would win and then train fewer.
    Where both final runs would train their most (10), both survivors do."""
    items = [(f"{i}.jpg", i % 10) for i in range(50_000)]
    split = DataSplit([str(c) for c in range(10)], items[:40_000], items[40_000:], "folders")
    sp = speed()  # 3 groups train at half the images/s of 2
    cands = [c for c in grid(DataProfile(40_000, 10_000, 10, 4000, 32), sp) if c.kind == "prefix"]
    two, three = (next(c for c in cands if c.groups == g and c.size == 192) for g in (2, 3))
    clock = [0.0]

    def run(cfg, split):  # takes the time predicted; 3 groups lead by 2 points at equal epochs
        _advance(clock, sp, cfg, split)
        acc = 0.6 + 0.05 * cfg.epochs + (0.02 if cfg.unfreeze == 3 else 0.0)
        return TrainResult("", RunResults(val_accuracy=acc, val_loss=1 - acc), [])

    cfg = TrainConfig(data="d", strategy="auto", budget=f"{budget}s").resolved()
    record = {"stages": []}
    final = {c.name: search.final_fit(c, sp, split, 0.6 * budget)[1] for c in (two, three)}
    winner = search.halving(cfg, [two, three], split, sp, Budget(budget, lambda: clock[0]), record,
                            Runners(run))  # fmt: skip
    pilots, survivors = record["stages"]
    assert pilots["epochs"] == search.PILOT_EPOCHS
    assert survivors["train_images"] >= pilots["train_images"]
    if budget == 3600:
        assert final[three.name] < final[two.name]  # what the shares come from
        epochs = survivors["epochs"]  # the final runs' own, on fewer images than all
        assert epochs[two.name] > epochs[three.name] >= search.FINAL_EPOCHS["prefix"][0]
        assert survivors["train_images"] < 32_000  # the inner training images
        assert survivors["predicted_seconds"] <= search.search_share(sp, split, budget) * budget
        assert winner is two
    else:  # both final runs train their most: so do both survivors
        assert final[two.name] == final[three.name] == survivors["epochs"] == search.FINAL_EPOCHS["prefix"][1]
        assert winner is three


def test_pilots_within_noise_of_the_last_survivor_go_on_too():
    """The best third goes on, and any pilot within one standard error of the last of it, up to
    half of all: 2 groups at 0.7148 behind 1 group at 0.7185, on 265 held-out images, is noise."""
    scores = [0.7296, 0.7185, 0.7148, 0.7074, 0.7037, 0.7037, 0.6704, 0.5852]
    ranked = [Candidate(f"c{i}", "features", {}, 224, scores=[{"score": s}]) for i, s in enumerate(scores)]
    noisy = scoring.survivors(ranked, 265)  # one standard error: 2.8 points
    assert [c.name for c in noisy] == ["c0", "c1", "c2", "c3"]  # half of 8; c4, c5 were close too
    exact = scoring.survivors(ranked, 1_000_000)  # no noise: the best third
    assert [c.name for c in exact] == ["c0", "c1"]
    assert [c.name for c in scoring.survivors(ranked[:2], 10)] == ["c0", "c1"]


def test_the_search_gives_way_where_the_fine_tunings_final_runs_would_be_starved():
    """Extracting every image once is cheap here (10,000 img/s), but training on cached maps is
    slow: after a full share for the search, most fine-tuning recipes would train fewer than
    WELL_FED epochs on all 40,000 images in an hour, so the search takes 30 %; with ten hours, or
    with only features to choose from, it takes its full share."""
    items = [(f"{i}.jpg", i % 10) for i in range(50_000)]
    split = DataSplit([str(c) for c in range(10)], items[:40_000], items[40_000:], "folders")
    sp = speed(forward={"efficientnet_lite0": 10_000.0}, decode=10_000.0,
               suffix_train={1: 40.0, 2: 20.0, 3: 10.0}, image_train={2: 10.0})  # fmt: skip
    cands = grid(DataProfile(40_000, 10_000, 10, 4000, 32), sp)
    tuned = [c for c in cands if c.kind != "features"]
    left = search.SAFETY * (1 - search.SEARCH_SHARE) * 3600
    epochs = sorted(search.final_fit(c, sp, split, left)[1] for c in tuned)
    assert epochs[len(epochs) // 2] < search.WELL_FED  # what the rule reads
    assert search.search_share(sp, split, 3600, cands) == 0.3
    assert search.search_share(sp, split, 3600) == search.SEARCH_SHARE  # no candidates: the old rule
    features = [c for c in cands if c.kind == "features"]
    assert search.search_share(sp, split, 3600, features) == search.SEARCH_SHARE
    assert search.search_share(sp, split, 36_000, cands) == search.SEARCH_SHARE


def _ranked(*entries: tuple[str, str, float]) -> list[Candidate]:
    """Candidates (backbone, kind, held-out score), in rank order."""
    return [
        Candidate(f"{kind} {b}", kind, {}, 192, backbone=b, scores=[{"score": s, "loss": 1 - s}])
        for b, kind, s in entries
    ]


def test_within_noise_of_the_best_the_larger_backbone_trains():
    """Full CIFAR-10, 60m, survivors on 2,000 inner held-out images: lite0 0.8525, lite2 0.8510,
    lite1 0.8495, 3 groups 0.837. One standard error is 0.8 points: the top three are tied, and
    lite2 trains. A larger backbone further behind, or of another kind, does not."""
    lite1, lite2 = "efficientnet_lite1", "efficientnet_lite2"
    ranked = _ranked((BASE, "prefix", 0.8525), (lite2, "prefix", 0.851), (lite1, "prefix", 0.8495),
                     (BASE, "prefix", 0.837))  # fmt: skip
    record: dict = {}
    assert scoring.larger_within_noise(ranked, 2000, None, record) is ranked[1]
    assert record["tie_break"]["within_noise"] == [c.name for c in ranked[:3]]
    assert record["tie_break"]["ranked_first"] == ranked[0].name and record["tie_break"]["noise"] == 0.0079
    # no noise to speak of: the best score trains, and nothing is recorded
    record = {}
    assert scoring.larger_within_noise(ranked, 10_000_000, None, record) is ranked[0] and not record
    # lite2 3 points behind, lite1 features tied but of another kind: lite0 trains
    far = _ranked((BASE, "prefix", 0.85), (lite1, "features", 0.849), (lite2, "prefix", 0.82))
    assert scoring.larger_within_noise(far, 2000, None, {}) is far[0]
    # two candidates of the largest backbone tied: the better ranked of them
    two = _ranked((BASE, "prefix", 0.85), (lite1, "prefix", 0.849), (lite1, "prefix", 0.848))
    assert scoring.larger_within_noise(two, 2000, None, {}) is two[1]


@pytest.mark.parametrize("lite2_score", [0.851, 0.80])
def test_the_search_trains_the_larger_backbone_where_the_survivors_tie(lite2_score):
    """halving applies the tie-break to its last stage: lite2's survivor within noise of lite0's
    trains; one 5 points behind does not."""
    items = [(f"{i}.jpg", i % 10) for i in range(50_000)]
    split = DataSplit([str(c) for c in range(10)], items[:40_000], items[40_000:], "folders")
    sp = speed(larger_suffix={"efficientnet_lite2": 150.0},
               forward={"efficientnet_lite0": 100.0, "efficientnet_lite2": 80.0})  # fmt: skip
    grid_ = grid(DataProfile(40_000, 10_000, 10, 4000, 32), sp)
    lite0 = next(c for c in grid_ if c.kind == "prefix" and c.groups == 2 and c.size == 192)
    lite2 = next(c for c in grid_ if c.backbone == "efficientnet_lite2" and c.kind == "prefix")
    table = {BASE: (0.80, 0.8525), "efficientnet_lite2": (0.79, lite2_score)}
    seen: list[str] = []

    def run(cfg, split):
        b = cfg.resolved().backbone
        acc = table[b][seen.count(b)]
        seen.append(b)
        return TrainResult("", RunResults(val_accuracy=acc, val_loss=1 - acc), [])

    cfg = TrainConfig(data="d", strategy="auto", budget="1h").resolved()
    record = {"stages": []}
    winner = search.halving(cfg, [lite0, lite2], split, sp, Budget(3600, lambda: 0.0), record, Runners(run))
    assert [s["name"] for s in record["stages"]] == ["pilots", "survivors"]
    assert record["search_share"] == search.search_share(sp, split, 3600, [lite0, lite2])
    assert winner is (lite2 if lite2_score > 0.84 else lite0)
    assert ("tie_break" in record) == (winner is lite2)
