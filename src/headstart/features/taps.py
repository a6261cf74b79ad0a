"""One frozen forward pass, several cached outputs: the pooled features (of one or more blocks)
and the prefix maps at several cut points of one backbone, each into its own cache.

Each output is exactly what its own run would compute and cache (the same modules, BN-folded
channels-last fast path, eval transform), so a run of any of them later finds every image in
its cache. `auto` uses it for pilots that differ only in what they train on top of the frozen part.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from headstart.data.transforms import Preprocess, eval_transform
from headstart.features.cache import FeatureCache
from headstart.features.engine import EngineSource
from headstart.features.extract import encode_batches, file_keys
from headstart.models.backbones import Backbone


class Taps(nn.Module):
    """images -> [the inputs of the `maps` modules, flattened (C, H, W), ..., the pooled features],
    side by side in one row per image."""

    def __init__(self, backbone: Backbone, maps: list[str]):
        super().__init__()
        self.backbone, self.maps = backbone, list(maps)
        self.config = backbone.config  # the fast path checks its folded copy at config.input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every output of one forward pass, concatenated."""
        got: dict[str, torch.Tensor] = {}

        def keep(name: str):
            return lambda module, args: got.__setitem__(name, args[0])

        # looked up by name at each call, so the fast path's copy taps its own modules
        hooks = [self.backbone.get_submodule(n).register_forward_pre_hook(keep(n)) for n in self.maps]
        try:
            features = self.backbone(x)
        finally:
            for h in hooks:
                h.remove()
        return torch.cat([got[n].flatten(1) for n in self.maps] + [features], dim=1)


@dataclass
class Target:
    """One cache the pass fills, and which columns of the Taps row are its rows."""

    cache: FeatureCache
    columns: slice


def fill_caches(items: list[tuple[str, int]], engine: EngineSource, pp: Preprocess, targets: list[Target], *,
                device, batch_size: int = 64, num_workers: int | None = None) -> dict:  # fmt: skip
    """Decode each image of `items` that some target's cache lacks, once, run the engine (of a Taps)
    once, and stream each target's columns into a new shard of its cache; the figures of the pass."""
    start = time.perf_counter()
    keys, failed = file_keys(items, list(range(len(items))), 0)
    todo = []  # per target: the items its cache lacks, in order
    for t in targets:
        hits = t.cache.lookup(list(keys.values()))
        todo.append({i: r for r, i in enumerate(i for i in keys if keys[i] not in hits)})
    union = sorted(set().union(*todo))
    dims = [t.columns.stop - t.columns.start for t in targets]
    writers = [t.cache.writer(len(m), d) if m else None for t, m, d in zip(targets, todo, dims, strict=True)]
    try:
        batches = encode_batches(engine, items, union, eval_transform(pp, uint8=True), device=device,
                                 batch_size=batch_size, num_workers=num_workers, draft=pp.resize_size,
                                 augment_seed=None, view=0, desc="shared frozen pass")  # fmt: skip
        for idx, f, bad in batches:
            failed += bad
            for t, w, m in zip(targets, writers, todo, strict=True):
                mine = [k for k, i in enumerate(idx) if i in m]
                if w is not None and mine:
                    w.put([m[idx[k]] for k in mine], [keys[idx[k]] for k in mine], f[mine, t.columns])
        for w in writers:
            if w is not None:
                w.finish()
    except BaseException:
        for w in writers:
            if w is not None:
                w.abort()
        raise
    return {"images": len(union), "failed": len(failed), "seconds": round(time.perf_counter() - start, 2)}
