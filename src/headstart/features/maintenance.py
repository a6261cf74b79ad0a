"""`headstart cache info|prune|clear`: what the feature cache holds, and removing what it need not."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from headstart.features.cache import LAST_USED, FeatureCache, clean_garbage, default_cache_dir


@dataclass
class CacheEntry:
    """One model key's folder: what it is for, its size and when it was last used."""

    key: str
    backbone: str
    weights: str  # checksum of the weights (the first 12 characters)
    views: str
    rows: int
    bytes: int
    last_used: float  # seconds since the epoch


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def cache_entries(root: str | os.PathLike | None = None) -> list[CacheEntry]:
    """Every model key in the cache, most recently used first."""
    root = Path(root) if root else default_cache_dir()
    out = []
    for folder in sorted(p for p in root.glob("*") if (p / "index.sqlite").exists()):
        spec = json.loads((folder / "spec.json").read_text()) if (folder / "spec.json").exists() else {}
        cache = FeatureCache(root, folder.name)  # opening it also cleans its garbage
        rows = cache._db.execute("SELECT COUNT(*) FROM features").fetchone()[0]
        cache.close()
        views = str(spec.get("views", "?"))
        if "prefix_split" in spec:
            views = f"prefix maps up to {spec['prefix_split']} {spec.get('map_shape')}"
        stamp = folder / LAST_USED
        used = stamp.stat().st_mtime if stamp.exists() else 0.0
        backbone, weights = str(spec.get("backbone", "?")), str(spec.get("weights", "?"))[:12]
        out.append(CacheEntry(folder.name, backbone, weights, views[:60], rows, _size(folder), used))
    return sorted(out, key=lambda e: -e.last_used)


def prune(root: str | os.PathLike | None = None, *, older_than_days: float | None = None) -> dict[str, int]:
    """Remove temporaries of killed runs, unreferenced and quarantined shards, damaged index copies,
    and (with older_than_days) whole entries not used for that long."""
    root = Path(root) if root else default_cache_dir()
    removed = {"temporaries": 0, "unreferenced shards": 0, "quarantined shards": 0, "entries": 0, "bytes": 0}
    before = _size(root) if root.exists() else 0
    for folder in [p for p in root.glob("*") if (p / "index.sqlite").exists()]:
        stamp = folder / LAST_USED
        age_days = (time.time() - stamp.stat().st_mtime) / 86400 if stamp.exists() else float("inf")
        if older_than_days is not None and age_days > older_than_days:
            shutil.rmtree(folder)
            removed["entries"] += 1
            continue
        cache = FeatureCache(root, folder.name)
        for k, v in clean_garbage(cache).items():
            removed[k] += v
        cache.close()
        for junk in [*folder.glob("quarantine/*"), *folder.glob("index.damaged-*")]:
            junk.unlink()
            removed["quarantined shards"] += junk.parent.name == "quarantine"
    removed["bytes"] = before - (_size(root) if root.exists() else 0)
    return removed


def clear(root: str | os.PathLike | None = None) -> int:
    """Delete every entry of the cache; returns the bytes freed."""
    root = Path(root) if root else default_cache_dir()
    freed = 0
    for folder in [p for p in root.glob("*") if (p / "index.sqlite").exists()]:
        freed += _size(folder)
        shutil.rmtree(folder)
    return freed
