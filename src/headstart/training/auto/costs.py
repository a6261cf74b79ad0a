"""What `auto`'s runs cost: predicted seconds of a pilot, a stage of pilots (with the frozen passes
they share) and a final run, knowing what the cache already holds."""

from __future__ import annotations

from collections.abc import Mapping

from headstart.data.layout import DataSplit
from headstart.training.auto.candidates import RUN_OVERHEAD, Candidate, extraction_seconds, seconds
from headstart.training.auto.profile import REFERENCE, Speed

Epochs = int | Mapping[str, int]  # a stage's epochs: one count for all, or one per candidate's name


def epochs_for(epochs: Epochs, c: Candidate) -> int:
    """The epochs `c` trains in a stage."""
    return epochs if isinstance(epochs, int) else epochs[c.name]


def stage_cost(cands, subs: list[DataSplit], speed: Speed, epochs: Epochs) -> float:
    """Predicted seconds of every candidate on every subset, in order, counting what the cache
    holds and what earlier runs of the stage will leave in it."""
    will = {k: set(v) for k, v in speed.extracted.items()}
    cost = 0.0
    for s in subs:
        cost += shared_cost(cands, s, speed, will)
        for c in cands:
            cost += predict(c, speed, s, epochs_for(epochs, c), will)
            will.setdefault(extraction_key(c), set()).update(p for p, _ in s.train + s.val)
    return cost


def predict(
    c: Candidate, speed: Speed, split: DataSplit, epochs: int, extracted: dict | None = None
) -> float:
    """seconds() for a run of `c` on `split`, knowing which of its images the cache holds."""
    paths = [p for p, _ in split.train + split.val]
    done = (speed.extracted if extracted is None else extracted).get(extraction_key(c), set())
    cached = sum(p in done for p in paths) / max(1, len(paths))
    return seconds(c, speed, n=len(split.train), m=len(split.val), epochs=epochs, cached=cached)


def extraction_key(c: Candidate) -> str:
    """What a run of `c` leaves in the cache (features, or prefix maps at a size and split point)."""
    blocks = c.options.get("feature_blocks", 1)
    return {
        "features": f"features {c.backbone} {c.size} {blocks}",
        "prefix": f"maps {c.backbone} {c.size} {c.groups}",
    }.get(c.kind, "")


def sharing(cands) -> list[list[Candidate]]:
    """Groups of two or more candidates whose pilots on one subset would each run the same frozen
    pass (features or maps of one backbone at one size): what shared_pass.warm runs once."""
    groups: dict[tuple, list[Candidate]] = {}
    for c in cands:
        if c.kind in ("features", "prefix"):
            groups.setdefault((c.backbone, c.size), []).append(c)
    return [g for g in groups.values() if len(g) > 1]


def shared_cost(cands, split: DataSplit, speed: Speed, will: dict) -> float:
    """Predicted seconds of the shared passes on `split` (the images some member's cache lacks, once
    each, on the engine the members would use, with its export); marks in `will` what they leave
    in the cache."""
    if not speed.shared_pass:
        return 0.0
    paths = [p for p, _ in split.train + split.val]
    cost = 0.0
    for group in sharing(cands):
        keys = {extraction_key(c) for c in group}
        lacking = sum(any(p not in will.get(k, ()) for k in keys) for p in paths)
        if lacking:  # priced as a features run: what the pass does is that run's extraction
            c = group[0]
            px, cached = (c.size / REFERENCE) ** 2, 1 - lacking / len(paths)
            extract = extraction_seconds(speed, c.backbone, len(paths), px=px, cached=cached)
            cost += RUN_OVERHEAD + speed.correction.get("features", 1.0) * extract
        for k in keys:
            will.setdefault(k, set()).update(paths)
    return cost


def final_seconds(c: Candidate, speed: Speed, split: DataSplit, epochs: int, n: int | None = None, *,
                  seen: float | None = None) -> float:  # fmt: skip
    """Predicted seconds of `c`'s final run on n of the training images (all by default), counting
    the training images whose features or maps the search left in the cache (`seen`, their share,
    where the caller has it)."""
    n = len(split.train) if n is None else n
    m = len(split.val)
    seen = cached_share(c, speed, split) if seen is None else seen
    return seconds(c, speed, n=n, m=m, epochs=epochs, cached=seen * n / (n + m))


def cached_share(c: Candidate, speed: Speed, split: DataSplit) -> float:
    """The share of the training images whose features or maps for `c` the search left in the cache."""
    done = speed.extracted.get(extraction_key(c), set())
    return sum(p in done for p, _ in split.train) / max(1, len(split.train))
