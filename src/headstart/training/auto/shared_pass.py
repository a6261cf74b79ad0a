"""auto's shared frozen pass: pilots that differ only in what trains on top of one frozen backbone
(features of one or three blocks, the linear probe, fine-tuning 1-3 groups on cached maps) at one
input size all start with the same forward pass over the same images. It runs once per stage
subset and fills every such pilot's cache, so each pilot finds its features or maps there.

On the ant/bee photos five pilots computed it for themselves, about 4 s each on 2 cores.
"""

from __future__ import annotations

import math

from headstart.core.device import pick_device
from headstart.data.layout import DataSplit
from headstart.features.cache import FeatureCache
from headstart.features.engine import ORT, EngineChoice
from headstart.features.prefix import prefix_spec, split_model
from headstart.features.taps import Taps, Target, fill_caches
from headstart.features.views import cache_spec, engine_for, open_cache
from headstart.models.backbones import Backbone, with_feature_blocks
from headstart.training.setup import backbone_for, build_model, preprocess_of, seed_everything
from headstart.training.strategies.base import select

TORCH = EngineChoice("torch")


def warm(cfgs: list, split: DataSplit) -> list[dict]:
    """One pass over `split`'s images for each group of two or more `cfgs` that read features or
    prefix maps of the same backbone, weights and preprocessing on PyTorch (where their own runs
    would compute them; ONNX Runtime has its own rows); what each pass did, and for which of
    `cfgs` ("served": their indices)."""
    groups: dict[tuple, list] = {}
    for i, cfg in enumerate(cfgs):
        strategy = select(cfg)
        if strategy.frozen_outputs is None or not cfg.cache or cfg.compile:
            continue
        key = (cfg.backbone, cfg.weights, cfg.device, cfg.cache_dir)
        groups.setdefault(key, []).append((i, cfg, strategy))
    return [r for members in groups.values() if len(members) > 1 for r in _passes(members, split)]


def _passes(members: list, split: DataSplit) -> list[dict]:
    """The passes of one backbone: one per input size that two or more members share."""
    cfg0 = members[0][1]
    seed_everything(cfg0.seed)  # as setup_run does before it builds: random weights ("none") match
    base = backbone_for(cfg0.with_overrides({"feature_blocks": 1}))
    device = pick_device(cfg0.device)
    by_size: dict[str, list] = {}
    for i, cfg, strategy in members:
        pp = preprocess_of(base, cfg.image_size)
        by_size.setdefault(repr(pp.to_dict()), []).append((i, cfg, strategy, pp))
    return [_one_pass(base, same, split, device) for same in by_size.values() if len(same) > 1]


def _one_pass(base: Backbone, members: list, split: DataSplit, device) -> dict:
    """Fill the caches of the members (one input size) that their runs would compute on PyTorch."""
    pp = members[0][3]
    weights = cache_spec(base, pp, TORCH)["weights"]
    blocks = max(
        [cfg.feature_blocks for _, cfg, s, _ in members if s.frozen_outputs == "features"], default=1
    )
    maps: list[str] = []
    wanted = []  # (cfg, cache spec, map module or None for features, row width)
    served = []
    for i, cfg, strategy, _ in members:
        if strategy.frozen_outputs == "features":
            b = with_feature_blocks(base, cfg.feature_blocks)
            n = (len(split.train) + len(split.val)) * cfg.cache_views
            spec, at, width = cache_spec(b, pp, TORCH), None, b.feature_dim
            ort = cache_spec(b, pp, EngineChoice(ORT))
        else:  # the model as the run builds it: its freezing decides where the prefix ends
            seed_everything(cfg.seed)
            model, _, _ = build_model(cfg, strategy, split.classes)
            sp = split_model(model, input_size=pp.input_size)
            n = len(split.train) * cfg.cache_views + len(split.val)
            spec, at, width = prefix_spec(model, sp, pp, TORCH), sp.at, math.prod(sp.shape)
            ort = prefix_spec(model, sp, pp, EngineChoice(ORT))
        if spec["weights"] != weights or engine_for(cfg.feature_options(), device, n, ort).name != "torch":
            continue
        if at is not None and at not in maps:
            maps.append(at)
        wanted.append((cfg, spec, at, width))
        served.append(i)
    taps = Taps(with_feature_blocks(base, blocks), maps)
    widths = [next(w for _, _, a, w in wanted if a == at) for at in maps]
    starts = {at: sum(widths[:i]) for i, at in enumerate(maps)}
    total = sum(widths) + taps.backbone.feature_dim
    caches: list[FeatureCache] = []
    targets = []
    try:
        for cfg, spec, at, width in wanted:
            caches.append(open_cache(spec, cfg.feature_options()))
            first = starts[at] if at is not None else total - width
            targets.append(Target(caches[-1], slice(first, first + width)))
        done = fill_caches(split.train + split.val, taps, pp, targets, device=device,
                           num_workers=wanted[0][0].num_workers) if targets else {"images": 0}  # fmt: skip
    finally:
        for c in caches:
            c.close()
    return {"size": pp.input_size, "served": served, **done}
