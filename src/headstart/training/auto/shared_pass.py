"""auto's shared frozen pass: pilots that differ only in what trains on top of one frozen backbone
(features of one or three blocks, the linear probe, fine-tuning 1-3 groups on cached maps) at one
input size all start with the same forward pass over the same images. It runs once per stage
subset and fills every such pilot's cache, so each pilot finds its features or maps there.

On the ant/bee photos five pilots computed it for themselves, about 4 s each on 2 cores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from headstart.core import logs
from headstart.core.device import pick_device
from headstart.core.errors import ConfigError
from headstart.data.layout import DataSplit
from headstart.data.transforms import Preprocess
from headstart.features.cache import FeatureCache
from headstart.features.engine import ORT, EngineChoice, EngineSource, EngineUnavailable
from headstart.features.prefix import prefix_spec, split_model
from headstart.features.taps import Taps, Target, fill_caches
from headstart.features.views import cache_spec, engine_for, engine_store, open_cache
from headstart.models.backbones import Backbone, with_feature_blocks
from headstart.training.setup import backbone_for, build_model, preprocess_of, seed_everything
from headstart.training.strategies.base import select

TORCH = EngineChoice("torch")


def warm(cfgs: list, split: DataSplit) -> list[dict]:
    """One pass over `split`'s images for each group of two or more `cfgs` that read features or
    prefix maps of the same backbone, weights and preprocessing, on the engine their runs would
    compute them on (the engine is part of the rows' cache key); what each pass did, and for which
    of `cfgs` ("served": their indices)."""
    groups: dict[tuple, list] = {}
    for i, cfg in enumerate(cfgs):
        strategy = select(cfg)
        if strategy.frozen_outputs is None or not cfg.cache or cfg.compile:
            continue
        key = (cfg.backbone, cfg.weights, cfg.device, cfg.cache_dir)
        groups.setdefault(key, []).append((i, cfg, strategy))
    return [r for members in groups.values() if len(members) > 1 for r in _passes(members, split)]


def _passes(members: list, split: DataSplit) -> list[dict]:
    """The passes of one backbone: one per input size (and engine) that two or more members share."""
    cfg0 = members[0][1]
    seed_everything(cfg0.seed)  # as setup_run does before it builds: random weights ("none") match
    base = backbone_for(cfg0.with_overrides({"feature_blocks": 1}))
    device = pick_device(cfg0.device)
    by_size: dict[Preprocess, list] = {}
    for i, cfg, strategy in members:
        by_size.setdefault(preprocess_of(base, cfg.image_size), []).append((i, cfg, strategy))
    passes = []
    for pp, same in by_size.items():
        by_engine: dict[str, list[_Output]] = {}
        for out in _outputs(base, same, split, pp, device):
            by_engine.setdefault(out.engine, []).append(out)
        passes += [
            _fill(base, outs, engine, split, pp, device)
            for engine, outs in by_engine.items()
            if len(outs) > 1
        ]
    return passes


@dataclass
class _Output:
    """One member's rows: its cache spec on the engine its run would pick, and where they come from."""

    index: int  # in warm's cfgs
    cfg: object
    spec: dict
    at: str | None  # the module whose input is the member's prefix map; None: pooled features
    width: int
    blocks: int  # pooled blocks of features (1 for maps)
    engine: str


def _outputs(base: Backbone, members: list, split: DataSplit, pp, device) -> list[_Output]:
    """What each member's run would cache, built as the run builds it, on the engine it would pick
    (where it would also use these weights)."""
    weights = cache_spec(base, pp, TORCH)["weights"]
    outs = []
    for i, cfg, strategy in members:
        if strategy.frozen_outputs == "features":
            b = with_feature_blocks(base, cfg.feature_blocks)
            n = (len(split.train) + len(split.val)) * cfg.cache_views
            at, width = None, b.feature_dim
            specs = {e: cache_spec(b, pp, EngineChoice(e)) for e in ("torch", ORT)}
        else:  # the model as the run builds it: its freezing decides where the prefix ends
            seed_everything(cfg.seed)
            model, _, _ = build_model(cfg, strategy, split.classes)
            try:
                sp = split_model(model, input_size=pp.input_size)
            except ConfigError:  # its own run says why (e.g. a backbone that is not a chain)
                continue
            n = len(split.train) * cfg.cache_views + len(split.val)
            at, width = sp.at, math.prod(sp.shape)
            specs = {e: prefix_spec(model, sp, pp, EngineChoice(e)) for e in ("torch", ORT)}
        if specs["torch"]["weights"] != weights:
            continue
        engine = engine_for(cfg.feature_options(), device, n, specs[ORT]).name
        blocks = cfg.feature_blocks if at is None else 1
        outs.append(_Output(i, cfg, specs[engine], at, width, blocks, engine))
    return outs


def _fill(base: Backbone, outs: list[_Output], engine: str, split: DataSplit, pp, device) -> dict:
    """One pass of Taps on `engine` that fills the caches of `outs`; what it did ("served": the
    indices of the members it served; none where ONNX Runtime cannot run the Taps)."""
    maps = list(dict.fromkeys(o.at for o in outs if o.at is not None))
    blocks = max(o.blocks for o in outs)
    taps = Taps(with_feature_blocks(base, blocks), maps)
    widths = [next(o.width for o in outs if o.at == at) for at in maps]
    total = sum(widths) + taps.backbone.feature_dim
    starts = {at: sum(widths[:k]) for k, at in enumerate(maps)}
    opts = outs[0].cfg.feature_options()
    key = {**cache_spec(base, pp, TORCH), "taps": maps, "taps_blocks": blocks}
    choice = EngineChoice(engine, note="auto's shared pass")
    source = EngineSource(choice, taps, pp, device, key=key, store=engine_store(opts))
    caches: list[FeatureCache] = []
    try:
        targets = []
        for o in outs:
            caches.append(open_cache(o.spec, opts))  # one cache folder: members are grouped by it
            first = starts[o.at] if o.at is not None else total - o.width
            targets.append(Target(caches[-1], slice(first, first + o.width)))
        done = fill_caches(
            split.train + split.val, source, pp, targets, device=device, num_workers=opts.num_workers
        )
    except EngineUnavailable as e:  # each member computes its own, and falls back as its run does
        logs.info(f"auto: no shared frozen pass on {engine} ({e})")
        return {
            "size": pp.input_size,
            "engine": engine,
            "served": [],
            "images": 0,
            "failed": 0,
            "note": str(e),
        }
    finally:
        for c in caches:
            c.close()
    return {"size": pp.input_size, "engine": engine, "served": [o.index for o in outs], **done}
