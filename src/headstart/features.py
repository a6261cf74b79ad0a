"""Pooled features from a frozen backbone: one forward pass per image, whatever the head epochs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Subset

from headstart import progress
from headstart.backbones import Backbone
from headstart.cache import FeatureCache, file_key
from headstart.data import ImageDataset, Skipped, make_loader
from headstart.device import autocast_for, to_device
from headstart.fastpath import inference_model


@dataclass
class Features:
    """Features [N, D] (CPU; float16 when read from the cache), labels, item indices, failures."""

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor
    failed: list[Skipped] = field(default_factory=list)
    seconds: float = 0.0
    hits: int = 0
    misses: int = 0
    rows: list[tuple[str, int]] | None = None  # (shard, row) in the cache, when load=False


def cache_stats(*parts: Features) -> dict:
    """The cache figures results.json reports, summed over several extractions."""
    hits, misses = sum(p.hits for p in parts), sum(p.misses for p in parts)
    return {
        "cache_hit_rate": round(hits / max(hits + misses, 1), 6),
        "features_extracted": misses,
        "features_from_cache": hits,
    }


@torch.inference_mode()
def extract_features(
    backbone: Backbone,
    items: list[tuple[str, int]],
    transform,
    *,
    device: torch.device,
    batch_size: int = 64,
    num_workers: int | None = None,
    draft: int | None = None,
    desc: str = "extract",
    subset=None,
    cache: FeatureCache | None = None,
    view: int = 0,
    augment_seed: int | None = None,
    channels_last: bool = True,  # the fast path: BN folded, channels-last (headstart.fastpath)
    load: bool = True,
) -> Features:
    """Features of `items` (or of the indices in `subset`), from the cache where present.

    Missing images run through the backbone once, in eval mode, and are streamed into a new
    cache shard as they come, so memory stays flat however many images there are. `view` > 0
    with `augment_seed` is an augmented view (a random `transform`) seeded by (seed, view, path).
    With load=False (a cache is required) x stays empty and `rows` says where each item's row lies.
    """
    if not load and cache is None:
        raise ValueError("extract_features(load=False) needs a cache to leave the rows in")
    net = inference_model(backbone, device) if channels_last else backbone.eval()
    wanted = list(range(len(items))) if subset is None else list(subset)
    start = time.perf_counter()
    failed: list[Skipped] = []
    keys: dict[int, str] = {}
    for i in wanted:
        try:
            keys[i] = file_key(items[i][0], view)
        except OSError as e:
            failed.append(Skipped(items[i][0], f"cannot read file: {e.strerror or e}"))
    hits = cache.lookup(list(keys.values())) if cache is not None else {}
    missing = [i for i in keys if keys[i] not in hits]
    dim = backbone.feature_dim
    live: dict[int, np.ndarray] = {}  # only without a cache
    writer = cache.writer(len(missing), dim) if cache is not None and missing else None
    row_of = {i: r for r, i in enumerate(missing)}
    try:
        if missing:
            images = ImageDataset(items, transform, draft=draft, seed=augment_seed, seed_by_path=True)
            images.epoch = view
            ds = Subset(images, missing)
            loader = make_loader(
                ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                pin_memory=device.type == "cuda", ramp=True,
            )  # fmt: skip
            with progress.bar(total=len(missing), desc=desc, unit="img") as pbar:
                for batch in loader:
                    failed += [Skipped(items[i][0], why) for i, why in batch.failed]
                    if batch.x is not None:
                        x = to_device(batch.x, device)
                        if channels_last:
                            x = x.contiguous(memory_format=torch.channels_last)
                        with autocast_for(device):
                            f = net(x).float().cpu().numpy()
                        idx = batch.index.tolist()
                        if writer is not None:
                            writer.put([row_of[i] for i in idx], [keys[i] for i in idx], f)
                        else:
                            live.update(zip(idx, f, strict=True))
                    pbar.update(len(batch.y) + len(batch.failed))
        if writer is not None:
            shard, rows = writer.finish()
            hits.update({keys[missing[r]]: (shard, r) for r in rows})
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    ok = [i for i in wanted if i in keys and (keys[i] in hits or i in live)]
    rows = [hits[keys[i]] for i in ok] if cache is not None else None
    if not load:
        x = torch.empty(0, dim, dtype=torch.float16)
    elif cache is not None:
        x = torch.from_numpy(cache.read(rows, dim))
    else:
        x = torch.from_numpy(np.stack([live[i] for i in ok])) if ok else torch.empty(0, dim)
    return Features(
        x=x,
        y=torch.tensor([items[i][1] for i in ok], dtype=torch.long),
        index=torch.tensor(ok, dtype=torch.long),
        failed=failed,
        seconds=time.perf_counter() - start,
        hits=len(keys) - len(missing),
        misses=len(missing),
        rows=rows,
    )
