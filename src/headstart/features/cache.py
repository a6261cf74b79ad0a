"""On-disk feature cache: float16 shards (memory-mapped .npy) indexed in SQLite.

Identity: a *model key* (backbone name, a checksum of every weight and buffer, preprocessing and
view spec) names a folder; inside it each image is keyed by its absolute path, size and mtime, so
a changed file or model misses exactly what it must. Extraction streams each batch into a new
shard on disk; nothing holds all features in memory while they are computed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import uuid
from pathlib import Path

import numpy as np
from torch import nn

from headstart.core.digest import tensors_checksum

CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """$HEADSTART_CACHE, else the platform's user cache folder (~/.cache/headstart on Linux)."""
    env = os.environ.get("HEADSTART_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("headstart", appauthor=False))


def weights_checksum(module: nn.Module) -> str:
    """A checksum of every parameter and buffer: identifies the weights whatever their source."""
    return tensors_checksum([*module.named_parameters(), *module.named_buffers()])


def model_key(spec: dict) -> str:
    """Folder name for one (model, preprocessing, view) combination."""
    blob = json.dumps({"format": CACHE_FORMAT, **spec}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def file_key(path: str, view: int = 0) -> str:
    """Per-image key: absolute path, size and mtime (ns), and the view number."""
    st = os.stat(path)
    return f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{view}"


class FeatureCache:
    """Features of one model key: look up, add (as a new shard), read back."""

    def __init__(self, root: str | os.PathLike, key: str, spec: dict | None = None):
        self.dir = Path(root) / key
        (self.dir / "shards").mkdir(parents=True, exist_ok=True)
        if spec is not None and not (self.dir / "spec.json").exists():
            (self.dir / "spec.json").write_text(json.dumps(spec, indent=2, default=str))
        self._db = sqlite3.connect(self.dir / "index.sqlite", timeout=60)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS features (key TEXT PRIMARY KEY, shard TEXT, row INTEGER)"
        )
        self._db.commit()
        self._maps: dict[str, np.ndarray] = {}

    def lookup(self, keys: list[str]) -> dict[str, tuple[str, int]]:
        """Which of `keys` are cached, and where."""
        found: dict[str, tuple[str, int]] = {}
        for i in range(0, len(keys), 900):  # SQLite's limit on bound parameters
            chunk = keys[i : i + 900]
            q = f"SELECT key, shard, row FROM features WHERE key IN ({','.join('?' * len(chunk))})"
            found.update({k: (s, r) for k, s, r in self._db.execute(q, chunk)})
        return {k: v for k, v in found.items() if (self.dir / "shards" / v[0]).exists()}

    def writer(self, n: int, dim: int) -> ShardWriter:
        """A new shard of n rows to stream features into."""
        return ShardWriter(self, n, dim)

    def read(self, entries: list[tuple[str, int]], dim: int) -> np.ndarray:
        """Rows [len(entries), dim] as float16, gathered shard by shard."""
        out = np.empty((len(entries), dim), dtype=np.float16)
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for pos, (shard, row) in enumerate(entries):
            by_shard.setdefault(shard, []).append((pos, row))
        for shard, pairs in by_shard.items():
            arr = self._map(shard)
            pos, rows = np.array(pairs).T
            out[pos] = arr[rows]
        return out

    def _map(self, shard: str) -> np.ndarray:
        if shard not in self._maps:
            self._maps[shard] = np.load(self.dir / "shards" / shard, mmap_mode="r")
        return self._maps[shard]

    def _commit_rows(self, shard: str, pairs: list[tuple[str, int]]) -> None:
        self._db.executemany(
            "INSERT OR REPLACE INTO features (key, shard, row) VALUES (?, ?, ?)",
            [(k, shard, r) for k, r in pairs],
        )
        self._db.commit()

    def close(self) -> None:
        """Release the index and memory maps."""
        self._maps.clear()
        self._db.close()


class ShardWriter:
    """Streams rows into a memory-mapped .npy, then publishes it atomically with its index rows."""

    def __init__(self, cache: FeatureCache, n: int, dim: int):
        self.cache, self.n = cache, n
        self.name = f"{uuid.uuid4().hex}.npy"
        self.tmp = cache.dir / "shards" / f".{self.name}.tmp"
        self.arr = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=np.float16, shape=(n, dim))
        self.keys: list[str | None] = [None] * n

    def put(self, rows: list[int], keys: list[str], feats: np.ndarray) -> None:
        """Write a batch of feature rows."""
        self.arr[rows] = feats.astype(np.float16)
        for r, k in zip(rows, keys, strict=True):
            self.keys[r] = k

    def finish(self) -> tuple[str, list[int]]:
        """Flush, publish the shard and index the rows that were filled; returns (shard, rows)."""
        self.arr.flush()
        del self.arr
        os.replace(self.tmp, self.cache.dir / "shards" / self.name)
        filled = [r for r, k in enumerate(self.keys) if k is not None]
        # rows of files that failed to load stay unindexed (they are retried next time)
        self.cache._commit_rows(self.name, [(self.keys[r], r) for r in filled])
        return self.name, filled

    def abort(self) -> None:
        """Drop a shard that was not finished."""
        try:
            del self.arr
        except AttributeError:
            pass
        self.tmp.unlink(missing_ok=True)
