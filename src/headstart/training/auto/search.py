"""The search: pilots on a subset, the best third again on all the inner training images, then the
winner on the whole training split with as many epochs as the budget leaves (successive halving).

Every choice is made on an inner split of the training images; the validation split is not read
until the final model is scored, once. Predicted and actual seconds of every run are recorded.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from headstart.core import logs
from headstart.core.errors import ConfigError
from headstart.data.layout import DataSplit, resolve_data
from headstart.models.backbones import check_weights
from headstart.training.auto.budget import Budget, parse_duration
from headstart.training.auto.candidates import (
    AUGMENTED_GROUPS,
    BASE,
    LARGER,
    LARGER_GROUPS,
    Candidate,
    extraction_seconds,
    grid,
    seconds,
)
from headstart.training.auto.costs import (
    Epochs,
    cached_share,
    final_seconds,
    stage_cost,
)
from headstart.training.auto.pilots import Runners, run_stage
from headstart.training.auto.profile import DataProfile, Speed, measure, seconds_per_rate
from headstart.training.auto.scoring import (
    larger_within_noise,
    rank_key,
    score_of,
    selection_metric,
    survivors,
)
from headstart.training.auto.splits import fold_count, folds, sample, stage_subsets

SEARCH_SHARE = 0.45  # of the budget left after measuring: pilots and the second stage together
SAFETY = 0.9  # plan to 90 % of the budget: predictions are estimates
# pilots see at least this many images (or every inner training image, where there are fewer):
# on fewer, fine-tuning has too few steps to show what it does with the final run's data. 5,000
# CIFAR-10 images, 10m: pilots on 96 training images scored extraction 0.645 and fine-tuning 2
# groups on cached maps 0.425; on 1,000 (a development split) the same recipes, 3 epochs, scored
# 0.714 and 0.755; with this floor the 10m run chose the fine-tuning (test 0.850, before 0.767)
PILOT_FLOOR = 500
PILOT_EPOCHS = 2
FINAL_EPOCHS = {"prefix": (2, 10), "images": (2, 10)}  # (fewest, most) epochs of the final run
# budgets from which the costliest recipes join: lite2 and full fine-tuning (measured on the ant/bee
# photos: full fine-tuning's pilot alone took 36 s of a 10-minute default run, and it scored lowest)
LONG_BUDGET = 1800
# epochs below which a fine-tuning's final run is starved, so the search gives it time. Full
# CIFAR-10, 60m, with 45 % for the search (1,567 s): every fine-tuned survivor scored within noise
# of the others, and the final run trained 4.69 epochs, still rising (0.9062 -> 0.9105 in the last);
# 5,000 CIFAR-10 images, 10m: the final run trains 7-9 epochs after a full share
WELL_FED = 5
# joins at any budget where the data is small (pilots on whole folds): features of lite1 beat
# lite0's by 1.2 points on five held-out splits of the ant/bee train folder (0.965 vs 0.953; lite2
# 0.965 too, at twice lite1's extra time). On large data one more pilot means fewer images for
# every pilot (60 of 5,000 CIFAR-10 images at 10m), and the ranking suffered
SHORT_BUDGET_LARGER = ("efficientnet_lite1",)


@dataclass
class Plan:
    """The chosen recipe as a TrainConfig, its deadline, and the record of how it was chosen."""

    config: object  # TrainConfig of the final run
    deadline: float | None  # monotonic-clock time by which training must stop
    record: dict = field(default_factory=dict)
    split: DataSplit | None = None  # a subset of the training images, where all of them do not fit
    most_epochs: int | None = None  # the final run may train this many where the deadline allows


def choose(
    cfg,
    *,
    run: Callable,
    clock: Callable[[], float] = time.monotonic,
    speed: Speed | None = None,
    warm: Callable | None = None,
) -> Plan:
    """Measure, search and return the final run's config; `run(cfg, split=...)` trains one pilot,
    `warm(cfgs, split)` fills the caches of pilots that share a frozen pass (shared_pass.warm)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("--strategy auto runs in one process: run it without torchrun, or name a strategy.")
    budget = Budget(parse_duration(cfg.budget), clock)
    if overridden := options_auto_chooses(cfg):
        logs.warning(
            f"auto chooses {', '.join(overridden)} itself, so the value you gave is not used: name a "
            "strategy (e.g. --strategy extract or finetune) to train with your own."
        )
    split = resolve_data(cfg.data, val=cfg.val, val_fraction=cfg.val_fraction, seed=cfg.seed)
    check_weights(cfg.backbone, cfg.weights)  # missing weights: say so now, not after the search
    profile = DataProfile.of(split)
    speed = speed or measure_for(cfg, split, budget)
    speed.shared_pass = warm is not None
    record = {
        "budget_seconds": budget.seconds,
        "profile": dataclasses.asdict(profile),
        "speed": speed.to_dict(),
        "selected_by": selection_metric(cfg),
        "stages": [],
    }
    everything = grid(profile, speed, cfg.backbone)
    candidates = affordable(everything, speed, profile, budget.left() * SAFETY)
    if too_long := [c.name for c in everything if c not in candidates]:
        record["unaffordable"] = too_long
        logs.info(f"auto: {len(too_long)} candidates whose shortest final run would take over 55 % of the "
                  f"budget left out: {', '.join(too_long)}")  # fmt: skip
    if profile.smallest_class < 5 or len(candidates) == 1:  # too few images to split for honest choices
        winner = candidates[0]
        record["note"] = "no search: too few images per class for an inner split, or one candidate affordable"
        logs.info(f"auto: {record['note']}")
    else:
        winner = halving(cfg, candidates, split, speed, budget, record, Runners(run, warm))
    final = final_config(cfg, winner, speed, split, budget)
    subset = None
    if final.train_images < profile.num_train:  # the budget cannot see every training image
        keep = sample(split.train, final.train_images, cfg.seed)
        subset = dataclasses.replace(split, train=sorted(keep))
    epochs = final.config.resolved().epochs
    record["chosen"] = winner.name
    record["final"] = {
        "options": final.options,
        "epochs": epochs,
        "most_epochs": final.most_epochs,
        "train_images": final.train_images,
        "predicted_seconds": round(final.seconds, 1),
    }
    record["search_seconds"] = round(budget.spent(), 1)
    on = f" on {final.train_images} of {profile.num_train} training images" if subset else ""
    logs.info(
        f"auto: chose {winner.name}{on}: {epochs} epochs, predicted {final.seconds:.0f}s of "
        f"{budget.left():.0f}s left"
    )
    return Plan(final.config, budget.deadline, record, subset, final.most_epochs)


def measure_for(cfg, split: DataSplit, budget: Budget) -> Speed:
    """This machine's speeds for the run's backbone and frozen engine; for the other embedded
    backbones where the run uses the default one (lite1 on small data, both where the budget
    allows, LONG_BUDGET: then their fine-tuning on cached maps too); and for full fine-tuning
    where the budget allows."""
    long = budget.seconds >= LONG_BUDGET
    larger: list[str] = []
    if cfg.backbone == BASE and cfg.weights is None:
        larger = [*LARGER] if long else [*SHORT_BUDGET_LARGER] if fold_count(split) > 1 else []
    images = len(split.train) + len(split.val)
    return measure(split, [cfg.backbone, *larger], device=cfg.device, weights=cfg.weights,
                   frozen_engine=cfg.frozen_engine, full=long, image_groups=(AUGMENTED_GROUPS,),
                   larger_groups=LARGER_GROUPS if long and larger else 0,
                   min_seconds=seconds_per_rate(budget.seconds, images))  # fmt: skip


def options_auto_chooses(cfg) -> list[str]:
    """The recipe options (epochs, lr, ...) that auto picks itself but that `cfg` sets to non-defaults."""
    chosen = ("epochs", "lr", "unfreeze", "image_size", "backbone_lr_mult", "feature_blocks", "cache_prefix",
              "patience", "keep_epoch", "tta")  # fmt: skip
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    # resolved() fills epochs and lr with auto's placeholders (1 and 1e-3)
    unset = {"epochs": (None, 1), "lr": (None, 1e-3)}
    return [n for n in chosen if getattr(cfg, n) not in unset.get(n, (defaults[n],))]


def affordable(candidates: list[Candidate], speed: Speed, profile: DataProfile, seconds_left: float):
    """Recipes whose shortest final run fits in 55 % of the budget (the rest is for searching)."""
    n, m = profile.num_train, profile.num_val
    shortest = {
        c.name: seconds(c, speed, n=n, m=m, epochs=FINAL_EPOCHS.get(c.kind, (1, 1))[0]) for c in candidates
    }
    keep = [c for c in candidates if shortest[c.name] <= 0.55 * seconds_left]
    return keep or [min(candidates, key=lambda c: seconds(c, speed, n=n, m=m, epochs=1))]


def halving(
    cfg,
    candidates: list[Candidate],
    split: DataSplit,
    speed: Speed,
    budget: Budget,
    record: dict,
    runners: Runners,
) -> Candidate:
    """Stage 1: every candidate on a first held-out fold (on a subset of it where data is large);
    stage 2: the best third and those within noise of it (survivors) on more: the other folds
    where data is small (scores averaged over all folds), the final runs in miniature where it is
    large (as_in_the_final; ranked on those scores alone)."""
    k = fold_count(split)
    parts = folds(split, cfg.seed, k)
    record["folds"] = k
    record["search_share"] = share = search_share(speed, split, budget.seconds, candidates)
    search_budget = share * budget.left()
    search_start = budget.clock()
    plan = [
        ("pilots", parts[:1], PILOT_EPOCHS),
        ("survivors", parts[1:] if k > 1 else parts, 2 if k > 1 else 3),
    ]
    alive, survived, part_only = candidates, None, False
    for name, stage_parts, epochs in plan:
        if name == "survivors" and len(alive) < 2:
            break
        if name == "pilots":
            alive, subs, cost = plan_pilots(alive, stage_parts[0], speed, len(split.classes), search_budget,
                                            cfg.seed)  # fmt: skip
            part_only = subs is not None and len(subs[0].train) < len(stage_parts[0].train)
        else:  # what the pilots left of the search's share, not a fixed half of it
            allowed = max(0.5 * search_budget, search_budget - (budget.clock() - search_start))
            left = SAFETY * budget.left() - allowed
            if k > 1:  # folds: all their images, the pilots' epochs in the final runs' shares
                epochs = at_equal_time(alive, epochs, final_epochs(alive, speed, split, left))
                subs, cost = _fit_stage(alive, stage_parts, speed, epochs, allowed, cfg.seed)
            else:
                seen = len(subs[0].train)  # the pilots'
                epochs, subs, cost = as_in_the_final(alive, epochs, stage_parts, speed, split, left, allowed,
                                                     cfg.seed, seen)  # fmt: skip
        if subs is None:
            record["note"] = (
                "no pilots: not even the two cheapest candidates fit in the search's share of the budget "
                "(a longer --budget buys a search)"
                if name == "pilots"
                else "no second stage: it does not fit in the search's share of the budget; the pilots decide"
            )
            logs.info(f"auto: {record['note']}")
            break
        if name == "pilots" and (dropped := [c.name for c in candidates if c not in alive]):
            record["left_out_for_time"] = dropped
            logs.info(f"auto: {len(dropped)} candidates left out to fit the budget: "
                      f"{', '.join(dropped)}")  # fmt: skip
        record["stages"].append(run_stage(cfg, name, alive, subs, epochs, cost, speed, runners, budget.clock))
        if name == "survivors":
            survived = (stage_parts, subs)
        # folds: every fold's score counts alike; one split: the second stage (more images and
        # epochs) outranks the pilots, whose few images favour the fastest learners
        only = len(subs) if k == 1 else None
        ranked = sorted((c for c in alive if rank_key(c, only) is not None), key=lambda c: rank_key(c, only))
        if name == "pilots":
            alive = survivors(ranked, len(subs[0].val))
        elif ranked:  # the pilots' fold counts too where folds average it in
            held_out = len(subs[0].val) * (k if k > 1 else len(subs))
            alive = [larger_within_noise(ranked, held_out, only, record)]
        if not alive:
            break
    winner = alive[0] if alive else candidates[0]
    if part_only and survived is not None:
        winner = _second_look(cfg, winner, candidates, *survived, split, speed, budget, record, runners)
    return winner


def as_in_the_final(cands, base: int, parts: list[DataSplit], speed: Speed, split: DataSplit, left: float,
                    allowed: float, seed: int,
                    floor: int) -> tuple[Epochs, list | None, float | None]:  # fmt: skip
    """The second stage on one split, as the final run in miniature where it fits: every survivor
    trains the epochs its final run would (final_fit, in what is left after the stage), on as many
    images as `allowed` pays for, `floor` (as many as the pilots saw) or more; else the same shares
    of fewer epochs (at_equal_time), down to `base` for the recipe that trains most, on as few
    images as fit. Its (epochs, subsets, predicted seconds); subsets None where nothing fits.

    At 3 epochs for all, features that had converged beat a fine-tuning that would train 10 (5,000
    CIFAR-10 images, 10m: 3-block features 0.823, 1 group on cached maps 0.815; the features'
    final run left 350 of 372 s unused). Fewer epochs in proportion, not the final's own, misled
    too: rounding gave 2 and 3 groups 1 epoch each where their final runs would train 4 and 2."""
    final = final_epochs(cands, speed, split, left)
    for top in range(max(final.values(), default=base), base, -1):
        epochs = at_equal_time(cands, top, final)
        subs, cost = _fit_stage(cands, parts, speed, epochs, allowed, seed, floor)
        if subs is not None:
            return epochs, subs, cost
    epochs = at_equal_time(cands, base, final)
    return (epochs, *_fit_stage(cands, parts, speed, epochs, allowed, seed))


def _second_look(cfg, winner: Candidate, candidates, parts: list[DataSplit], subs: list[DataSplit],
                 split: DataSplit, speed: Speed, budget: Budget, record: dict,
                 runners: Runners) -> Candidate:  # fmt: skip
    """Where the pilots saw part of the data and the winner's final run leaves time (features train
    in seconds), the winner and the best pilot of another kind (features, fine-tuning on cached
    maps, on images) run again on more images, as their final runs would (_look), and the higher
    there trains: few pilot images favour features over fine-tuning."""
    others = [c for c in candidates if c.scores and c.kind != winner.kind and score_of(c.scores[0])]
    if not others:
        return winner
    c = max(others, key=lambda c: score_of(c.scores[0]))
    epochs, look, cost = _look(winner, c, parts, len(subs[0].train) + 1, speed, split, budget, cfg.seed)
    if look is None:
        return winner
    record["stages"].append(
        run_stage(cfg, "second look", [winner, c], look, epochs, cost, speed, runners, budget.clock)
    )
    theirs, ours = rank_key(c, len(look)), rank_key(winner, len(look))
    if theirs is not None and (ours is None or theirs < ours):  # None: the run failed there
        logs.info(f"auto: {c.name} ranks above {winner.name} on more images: it trains instead")
        return c
    return winner


def _look(winner: Candidate, c: Candidate, parts: list[DataSplit], more: int, speed: Speed, split: DataSplit,
          budget: Budget, seed: int) -> tuple[Epochs, list | None, float | None]:  # fmt: skip
    """The second look's (epochs, subsets, predicted seconds), on `more` images or more (subsets
    None where it does not fit): the final runs in miniature where they fit, reserving the time of
    `c`'s final run at the most epochs that leaves room for the look (and the winner's at its
    most); else 3 epochs in their shares, reserving `c`'s shortest. At 3 epochs on 4,000 CIFAR-10
    images 3-block features beat 1 group on cached maps (0.823 against 0.815) where 10 epochs on
    1,260 had ranked them the other way (0.786 against 0.762)."""
    pair, room = [winner, c], SAFETY * budget.left()
    keep = final_seconds(winner, speed, split, FINAL_EPOCHS.get(winner.kind, (1, 1))[1])
    lo, hi = FINAL_EPOCHS.get(c.kind, (1, 1))

    def fit(epochs: Epochs, final: float):
        look, cost = _fit_stage(pair, parts, speed, epochs, room - final, seed, more)
        return (epochs, look, cost) if look is not None and len(look[0].train) >= more else None

    for e in range(hi, lo - 1, -1):
        final = max(keep, final_seconds(c, speed, split, e))
        if found := fit({x.name: final_fit(x, speed, split, final)[1] for x in pair}, final):
            return found
    final = max(keep, final_seconds(c, speed, split, lo))
    return fit(at_equal_time(pair, 3, final_epochs(pair, speed, split, final)), final) or (3, None, None)


def search_share(speed: Speed, split: DataSplit, budget_seconds: float, cands=()) -> float:
    """The share of the budget the search may spend: less where merely extracting every image once
    takes a good part of it (large data: the final run needs the time more than the pilots do),
    priced on the engine that would extract them (ONNX Runtime runs lite0 2.6x faster on 2 cores);
    less also where, after a full share, the fine-tuning recipes among `cands` (the median of them)
    would train fewer than WELL_FED epochs in their final runs."""
    images = len(split.train) + len(split.val)
    once = min(extraction_seconds(speed, b, images) for b in speed.forward)
    if once >= 0.1 * budget_seconds:
        return 0.3
    tuned = [c for c in cands if c.kind in FINAL_EPOCHS]
    if tuned:
        left = SAFETY * (1 - SEARCH_SHARE) * budget_seconds
        epochs = sorted(final_fit(c, speed, split, left)[1] for c in tuned)
        if epochs[len(epochs) // 2] < WELL_FED:
            return 0.3
    return SEARCH_SHARE


def plan_pilots(cands, first: DataSplit, speed: Speed, classes: int, search_seconds: float, seed: int):
    """The pilots of a search that may spend `search_seconds`: half of it, on the first fold, at
    least pilot_floor images each (pilots_that_fit); shared by the search and `headstart plan`."""
    floor, least = pilot_floor(first, classes), min(len(first.train), 10 * classes)
    return pilots_that_fit(cands, [first], speed, PILOT_EPOCHS, 0.5 * search_seconds, seed, floor, least)


def pilot_floor(part: DataSplit, classes: int) -> int:
    """The fewest training images a pilot should see: PILOT_FLOOR (10 per class where more), or
    every image of the part where it holds fewer."""
    return min(len(part.train), max(PILOT_FLOOR, 10 * classes))


def pilots_that_fit(cands, parts: list[DataSplit], speed: Speed, epochs: int, seconds_allowed: float,
                     seed: int, floor: int = 10, fewest_images: int = 10):  # fmt: skip
    """_fit_stage for the pilots, on `floor` images or more where leaving out at most half of the
    candidates makes them fit; else the half that stays on fewer images, leaving out more (down to
    two) only where even `fewest_images` do not fit (the search passes 10 per class: on 3 per class,
    5m on 1,000 CIFAR-10 images, pilots scored 0.18-0.46, noise, and cost nearly as much: the
    held-out images dominate). The most numerous family gives way first (features, fine-tuning on
    cached maps, on images; of each backbone), the candidate whose absence saves most: (the
    candidates that fit, their subsets, their predicted cost)."""
    alive = list(cands)
    fewest_images = min(floor, fewest_images)
    for least, fewest in dict.fromkeys(((floor, max(2, (len(cands) + 1) // 2)), (fewest_images, 2))):
        while True:
            subs, cost = _fit_stage(alive, parts, speed, epochs, seconds_allowed, seed, least)
            if subs is not None:
                return alive, subs, cost
            if len(alive) <= fewest:
                break
            alive.remove(_gives_way(alive, parts, speed, epochs, seed, least))
    return alive, None, None


def _gives_way(alive: list[Candidate], parts: list[DataSplit], speed: Speed, epochs: int, seed: int,
               n: int) -> Candidate:  # fmt: skip
    """The candidate to leave out: of the most numerous family, the one whose absence saves most
    (counting the cache its siblings share: a second learning rate on the same maps costs little)."""
    subs = stage_subsets(parts, n, seed)
    kinds = Counter(_family(c) for c in alive)
    pool = [c for c in alive if kinds[_family(c)] == max(kinds.values())]
    whole = stage_cost(alive, subs, speed, epochs)
    # reversed: of candidates that save alike, the later in the grid (a variant: lr x0.1) goes first
    saves = lambda c: whole - stage_cost([x for x in alive if x is not c], subs, speed, epochs)  # noqa: E731
    return max(reversed(pool), key=saves)


def _fit_stage(cands, parts: list[DataSplit], speed: Speed, epochs: Epochs, seconds_allowed: float, seed: int,
               floor: int = 10):  # fmt: skip
    """The largest subsets of the parts (from all their images down, a quarter fewer at a time, to
    `floor`) on which every candidate runs within `seconds_allowed`, counting what the cache holds
    and what earlier runs of the stage will leave in it; (None, None) if none fits."""
    n = len(parts[0].train)
    while True:
        subs = stage_subsets(parts, n, seed)
        cost = stage_cost(cands, subs, speed, epochs)
        if cost <= seconds_allowed:
            return subs, cost
        if n <= floor:
            return None, None
        n = max(floor, int(n * 0.75))


def _family(c: Candidate) -> tuple[str, str]:
    """What a candidate's pilot tells apart from the others': its kind, and its backbone."""
    return c.kind, c.backbone


@dataclass
class _Final:
    config: object
    options: dict
    seconds: float
    train_images: int
    most_epochs: int | None  # epochs the run may stretch to, where its first shows time for more


def final_config(cfg, c: Candidate, speed: Speed, split: DataSplit, budget: Budget) -> _Final:
    """The winner on the whole training split with as many epochs as fit in what is left (on a
    stratified subset of it, where even the fewest epochs on all of it would not fit)."""
    n, epochs, predicted = final_fit(c, speed, split, SAFETY * budget.left())
    # the last epoch is the model: picking the best on the validation split would be a choice made there
    options = {
        **c.run_options(cfg),
        "epochs": c.epochs(epochs) if c.kind != "features" else None,
        "keep_epoch": "last",
        "patience": None,  # early stopping would choose the epoch on the validation split too
    }
    final = cfg.with_overrides({**options, "strategy": c.options["strategy"]})
    hi = FINAL_EPOCHS.get(c.kind, (1, 1))[1]
    most = c.epochs(hi) if c.kind != "features" else None  # head epochs on features cost next to nothing
    return _Final(final, options, predicted, n, most)


def final_fit(c: Candidate, speed: Speed, split: DataSplit, left: float) -> tuple[int, int, float]:
    """(training images, epochs, predicted seconds) of `c`'s final run in `left` seconds: every
    training image where its fewest epochs fit (else a fifth fewer at a time), then as many
    epochs as fit, up to its most."""
    n = len(split.train)
    seen = cached_share(c, speed, split)  # once: cost() runs for every epoch count tried

    def cost(n: int, epochs: int) -> float:
        return final_seconds(c, speed, split, epochs, n, seen=seen)

    lo, hi = FINAL_EPOCHS.get(c.kind, (1, 1))
    while n > 10 * len(split.classes) and cost(n, lo) > left:
        n = int(n * 0.8)
    epochs = lo
    while epochs < hi and cost(n, epochs + 1) <= left:
        epochs += 1
    return n, epochs, cost(n, epochs)


def final_epochs(cands, speed: Speed, split: DataSplit, left: float) -> dict[str, int]:
    """The epochs each candidate's final run would train in `left` seconds (final_fit), by name;
    features, whose head epochs cost next to nothing, are not counted."""
    return {c.name: final_fit(c, speed, split, left)[1] for c in cands if c.kind in FINAL_EPOCHS}


def at_equal_time(cands, epochs: int, final: dict[str, int]) -> Epochs:
    """A later stage's epochs for each candidate, in the shares the final run would give them
    (`final`, from final_epochs): `epochs` for the recipe whose final run trains the most epochs,
    fewer in proportion for one that trains fewer (at least 1). At equal epochs a recipe twice as
    slow won that stage and then trained half as long: 5,000 CIFAR-10 images, 10m, 3 groups on
    cached maps (4 final epochs) 0.821, where 2 groups (9) had scored 0.849 in an earlier run."""
    if len(set(final.values())) < 2:
        return epochs
    most = max(final.values())
    return {c.name: max(1, int(epochs * final[c.name] / most + 0.5)) if c.name in final else epochs
            for c in cands}  # fmt: skip
