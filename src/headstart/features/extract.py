"""Pooled features from a frozen backbone: one forward pass per image, whatever the head epochs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Subset

from headstart.core.logs import progress
from headstart.data.layout import Skipped
from headstart.data.loading import ImageDataset, make_loader
from headstart.features.cache import FeatureCache, file_key
from headstart.features.engine import EngineSource


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
    recomputed: int = 0  # cached rows dropped because their shard was damaged, computed again
    rows: list[tuple[str, int]] | None = None  # (shard, row) in the cache, when load=False


def cache_stats(*parts: Features) -> dict:
    """The cache figures results.json reports, summed over several extractions."""
    hits, misses = sum(p.hits for p in parts), sum(p.misses for p in parts)
    return {
        "cache_hit_rate": round(hits / max(hits + misses, 1), 6),
        "features_extracted": misses,
        "features_from_cache": hits,
        "cache_rows_recomputed": sum(p.recomputed for p in parts),
    }


@torch.inference_mode()
def extract_features(
    items: list[tuple[str, int]],
    transform,
    *,
    engine: EngineSource,
    dim: int,
    device: torch.device,
    batch_size: int = 64,
    num_workers: int | None = None,
    draft: int | None = None,
    desc: str = "extract",
    subset=None,
    cache: FeatureCache | None = None,
    view: int = 0,
    augment_seed: int | None = None,
    load: bool = True,
) -> Features:
    """Features [N, dim] of `items` (or of the indices in `subset`), from the cache where present.

    `transform` gives uint8 images. Missing images run once through the engine (built at the first
    batch that needs it) and stream into a new cache shard, so memory stays flat however many there are.
    `view` > 0 with `augment_seed` is an augmented view seeded by (seed, view, path). load=False
    (a cache is required) leaves x empty; `rows` says where each item's row lies.
    """
    if not load and cache is None:
        raise ValueError("extract_features(load=False) needs a cache to leave the rows in")
    wanted = list(range(len(items))) if subset is None else list(subset)
    start = time.perf_counter()
    keys, failed = file_keys(items, wanted, view)
    n_unstatable = len(failed)
    before = cache.recomputed if cache is not None else 0
    hits = cache.lookup(list(keys.values())) if cache is not None else {}
    recomputed = cache.recomputed - before if cache is not None else 0
    missing = [i for i in keys if keys[i] not in hits]
    live: dict[int, np.ndarray] = {}  # only without a cache
    writer = cache.writer(len(missing), dim) if cache is not None and missing else None
    row_of = {i: r for r, i in enumerate(missing)}
    try:
        batches = encode_batches(
            engine,
            items,
            missing,
            transform,
            device=device,
            batch_size=batch_size,
            num_workers=num_workers,
            draft=draft,
            augment_seed=augment_seed,
            view=view,
            desc=desc,
        )
        for idx, f, bad in batches:
            failed += bad
            if writer is not None:
                writer.put([row_of[i] for i in idx], [keys[i] for i in idx], f)
            else:
                live.update(zip(idx, f, strict=True))
        if writer is not None:
            shard, rows = writer.finish()
            hits.update({keys[missing[r]]: (shard, r) for r in rows})
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    ok = [i for i in wanted if i in keys and (keys[i] in hits or i in live)]
    rows = [hits[keys[i]] for i in ok] if cache is not None else None
    f = Features(
        _matrix(ok, rows, live, cache, dim, load),
        torch.tensor([items[i][1] for i in ok], dtype=torch.long),
        torch.tensor(ok, dtype=torch.long),
        failed,
        rows=rows,
    )
    f.seconds, f.hits, f.recomputed = time.perf_counter() - start, len(keys) - len(missing), recomputed
    f.misses = len(missing) - (len(failed) - n_unstatable)  # images that went through the backbone
    return f


def _matrix(
    ok: list[int], rows, live: dict, cache: FeatureCache | None, dim: int, load: bool
) -> torch.Tensor:
    """The features of the `ok` items, in order: read from the cache, or the ones computed live."""
    if not load:
        return torch.empty(0, dim, dtype=torch.float16)
    if cache is not None:
        return torch.from_numpy(cache.read(rows, dim))
    return torch.from_numpy(np.stack([live[i] for i in ok])) if ok else torch.empty(0, dim)


def encode_batches(
    engine: EngineSource,
    items,
    missing: list[int],
    transform,
    *,
    device,
    batch_size,
    num_workers,
    draft,
    augment_seed,
    view,
    desc,
) -> Iterator[tuple[list[int], np.ndarray, list[Skipped]]]:
    """Decode the `missing` items in loader workers and run the engine: per batch, the item
    indices that loaded, their features [B, D] and the files that failed."""
    if not missing:
        return
    images = ImageDataset(items, transform, draft=draft, seed=augment_seed, seed_by_path=True)
    images.epoch = view
    loader = make_loader(
        Subset(images, missing),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        ramp=True,
    )
    with progress(total=len(missing), desc=desc, unit="img") as pbar:
        for batch in loader:
            failed = [Skipped(items[i][0], why) for i, why in batch.failed]
            f = np.empty((0, 0), np.float32)
            if batch.x is not None:
                f = engine.get(batch.x).run(batch.x)
            pbar.update(len(batch.y) + len(batch.failed))
            yield batch.index.tolist(), f, failed


def file_keys(
    items: list[tuple[str, int]], wanted: list[int], view: int
) -> tuple[dict[int, str], list[Skipped]]:
    """Cache keys of the wanted items; files that cannot even be stat'ed are failures."""
    keys: dict[int, str] = {}
    failed: list[Skipped] = []
    for i in wanted:
        try:
            keys[i] = file_key(items[i][0], view)
        except OSError as e:
            failed.append(Skipped(items[i][0], f"cannot read file: {e.strerror or e}"))
    return keys, failed
