"""On-disk feature cache: float16 shards (.npy, read memory-mapped) indexed in SQLite; trusts nothing.

Identity: a *model key* (backbone name, a checksum of every weight and buffer, preprocessing and
view spec) names a folder; inside it each image is keyed by its absolute path, size and mtime, so
a changed file or model misses exactly what it must. Extraction streams each batch into a new
shard on disk; nothing holds all features in memory while they are computed.

Trust: every shard's size and checksum are recorded when it is written and verified once when a
process first reads it; a damaged shard is moved to quarantine/, its rows are dropped (and so
computed again) and the run says how many. A damaged index is moved aside and rebuilt. Shards are
written with plain writes into space reserved up front (never through a memory map, where a full
disk is a SIGBUS), so a full disk is a clear error and no half shard is ever published. Stale
temporary files of killed writers and shards no row refers to are removed when a cache is opened.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from torch import nn

from headstart.core import logs
from headstart.core.digest import tensors_checksum
from headstart.core.errors import DiskFull
from headstart.core.files import FULL, atomic_write_bytes

CACHE_FORMAT = 2  # 2: shards carry a checksum in the index
LAST_USED = "last_used"


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


def file_checksum(path: Path) -> str:
    """blake2b of a whole file, read in 4 MiB blocks."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def disk_full(directory: Path, needed: int | None, what: str) -> DiskFull:
    """The paragraph for a cache that does not fit: where, how much, and the ways out."""
    try:
        free = shutil.disk_usage(directory if directory.exists() else directory.parent).free
    except OSError:
        free = 0
    need = f"needs {needed / 1e6:.1f} MB and " if needed is not None else "failed: "
    return DiskFull(
        f"The feature cache in {str(directory)!r} ran out of disk space: {what} {need}"
        f"{free / 1e6:.1f} MB are free. Free space there, point --cache-dir "
        "(or $HEADSTART_CACHE) at a disk with room, or pass --no-cache; `headstart cache info` shows "
        "what the cache holds and `headstart cache prune` removes what it no longer needs. Nothing "
        "half-written was kept."
    )


class FeatureCache:
    """Features of one model key: look up (verified), add (as a new shard), read back."""

    def __init__(self, root: str | os.PathLike, key: str, spec: dict | None = None):
        self.dir = Path(root) / key
        self._maps: dict[str, np.ndarray] = {}
        self._verified: dict[str, bool] = {}
        self.recomputed = 0  # rows dropped from damaged shards, computed again by the caller
        with full_disk_is_an_error(self.dir, "opening the cache"):
            (self.dir / "shards").mkdir(parents=True, exist_ok=True)
            if spec is not None and not (self.dir / "spec.json").exists():
                atomic_write_bytes(self.dir / "spec.json", json.dumps(spec, indent=2, default=str).encode())
            self._db = self._open_index()
            clean_garbage(self)
            (self.dir / LAST_USED).touch()

    # ------------------------------------------------------------------------- index

    def _open_index(self) -> sqlite3.Connection:
        path = self.dir / "index.sqlite"
        try:
            return _connect(path)
        except sqlite3.OperationalError:  # locked, or a full disk: not damage
            raise
        except sqlite3.DatabaseError as e:  # "file is not a database", "disk image is malformed"
            return self._replace_index(e)

    def _replace_index(self, error: Exception) -> sqlite3.Connection:
        """Move a damaged index aside and start an empty one (its shards become unreferenced)."""
        path = self.dir / "index.sqlite"
        with contextlib.suppress(AttributeError, sqlite3.Error):
            self._db.close()
        aside = path.with_name(f"index.damaged-{time.time_ns()}.sqlite")
        os.replace(path, aside)
        logs.warning(
            f"cache index {path} was damaged ({error}); moved it to {aside.name} and started a new one: "
            "its features are computed again."
        )
        self._db = _connect(path)
        clean_garbage(self)
        return self._db

    def lookup(self, keys: list[str]) -> dict[str, tuple[str, int]]:
        """Which of `keys` are cached in verified shards, and where."""
        found: dict[str, tuple[str, int]] = {}
        try:
            for i in range(0, len(keys), 900):  # SQLite's limit on bound parameters
                chunk = keys[i : i + 900]
                q = f"SELECT key, shard, row FROM features WHERE key IN ({','.join('?' * len(chunk))})"
                found.update({k: (s, r) for k, s, r in self._db.execute(q, chunk)})
        except sqlite3.OperationalError:
            raise
        except sqlite3.DatabaseError as e:  # damaged beyond its header: nothing in it can be trusted
            self._replace_index(e)
            return {}
        good = {s for s in {s for s, _ in found.values()} if self.verify(s)}
        dropped = sum(1 for s, _ in found.values() if s not in good)
        self.recomputed += dropped
        return {k: v for k, v in found.items() if v[0] in good}

    def verify(self, shard: str) -> bool:
        """The shard exists and has the size and checksum recorded when it was written (checked once
        per process); a damaged one is quarantined and its rows dropped."""
        if shard in self._verified:
            return self._verified[shard]
        path = self.dir / "shards" / shard
        record = self._db.execute("SELECT bytes, checksum FROM shards WHERE name = ?", (shard,)).fetchone()
        if not path.exists():
            ok, why = False, None  # published later by a concurrent writer, or removed: just a miss
        elif record is None:
            ok, why = False, "no checksum recorded"
        elif path.stat().st_size != record[0]:
            ok, why = False, f"{path.stat().st_size} bytes, {record[0]} expected (truncated or extended)"
        else:
            ok = file_checksum(path) == record[1]
            why = None if ok else "contents differ from the checksum recorded when it was written"
        if why is not None:
            self._quarantine(shard, why)
        self._verified[shard] = ok
        return ok

    def _quarantine(self, shard: str, why: str) -> None:
        n = self._db.execute("SELECT COUNT(*) FROM features WHERE shard = ?", (shard,)).fetchone()[0]
        qdir = self.dir / "quarantine"
        qdir.mkdir(exist_ok=True)
        os.replace(self.dir / "shards" / shard, qdir / shard)
        with self._db:
            self._db.execute("DELETE FROM features WHERE shard = ?", (shard,))
            self._db.execute("DELETE FROM shards WHERE name = ?", (shard,))
        logs.warning(
            f"cache shard {shard} is damaged ({why}): moved to {qdir}; its {n} rows are computed again."
        )

    # ------------------------------------------------------------------------- read and write

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

    def _publish(self, name: str, tmp: Path, pairs: list[tuple[str, int]], size: int, checksum: str) -> None:
        """Index the rows and the shard's checksum, then move the shard into place (a crash in between
        leaves rows whose shard is missing: misses, never wrong features)."""
        with full_disk_is_an_error(self.dir, f"indexing {len(pairs)} rows"), self._db:
            self._db.execute("INSERT OR REPLACE INTO shards VALUES (?, ?, ?)", (name, size, checksum))
            self._db.executemany(
                "INSERT OR REPLACE INTO features (key, shard, row) VALUES (?, ?, ?)",
                [(k, name, r) for k, r in pairs],
            )
        os.replace(tmp, self.dir / "shards" / name)
        self._verified[name] = True

    def close(self) -> None:
        """Release the index and memory maps."""
        self._maps.clear()
        self._db.close()


@contextlib.contextmanager
def full_disk_is_an_error(directory: Path, what: str) -> Iterator[None]:
    """A full disk under SQLite or a file write becomes the cache's DiskFull paragraph."""
    try:
        yield
    except sqlite3.OperationalError as e:
        if "full" not in str(e):
            raise
        raise disk_full(directory, None, what) from e
    except DiskFull as e:
        raise disk_full(directory, None, what) from e
    except OSError as e:
        if e.errno not in FULL:
            raise
        raise disk_full(directory, None, what) from e


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=60)
    db.execute("CREATE TABLE IF NOT EXISTS features (key TEXT PRIMARY KEY, shard TEXT, row INTEGER)")
    db.execute("CREATE TABLE IF NOT EXISTS shards (name TEXT PRIMARY KEY, bytes INTEGER, checksum TEXT)")
    db.execute("CREATE INDEX IF NOT EXISTS by_shard ON features (shard)")
    db.commit()
    return db


def _lock(fd: int) -> bool:
    """Take an exclusive advisory lock that says 'a live writer holds this file'; False where another
    process holds it (or where the platform has no such locks)."""
    try:
        import fcntl
    except ImportError:  # Windows
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _abandoned(tmp: Path, stale_after: float) -> bool:
    """No live writer holds this temporary (its process died): it can go."""
    try:
        fd = os.open(tmp, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        age = time.time() - os.fstat(fd).st_mtime
        if age < 2:  # its writer may be about to lock it
            return False
        try:
            import fcntl  # noqa: F401
        except ImportError:  # no advisory locks: judge by age
            return age > stale_after
        return _lock(fd)
    finally:
        os.close(fd)


def clean_garbage(cache: FeatureCache, *, stale_after: float = 24 * 3600) -> dict[str, int]:
    """Remove temporaries no live writer holds (a killed run's) and shards no row refers to."""
    removed = {"temporaries": 0, "unreferenced shards": 0}
    shards = cache.dir / "shards"
    for tmp in shards.glob(".*.tmp"):
        if _abandoned(tmp, stale_after):
            tmp.unlink(missing_ok=True)
            removed["temporaries"] += 1
    # list first, then ask the index: a shard is renamed into place only after its rows are indexed
    present = list(shards.glob("*.npy"))
    referenced = {s for (s,) in cache._db.execute("SELECT DISTINCT shard FROM features")}
    for path in present:
        if path.name not in referenced:
            path.unlink(missing_ok=True)
            with cache._db:
                cache._db.execute("DELETE FROM shards WHERE name = ?", (path.name,))
            removed["unreferenced shards"] += 1
    return removed


class ShardWriter:
    """Streams rows into a new .npy file whose space is reserved up front; publishes it with its
    checksum and index rows in finish(), or removes it in abort()."""

    def __init__(self, cache: FeatureCache, n: int, dim: int):
        self.cache, self.n, self.dim = cache, n, dim
        self.name = f"{uuid.uuid4().hex}.npy"
        self.tmp = cache.dir / "shards" / f".{self.name}.tmp"
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": "<f2", "fortran_order": False, "shape": (n, dim)}
        )
        self.offset = len(header.getvalue())
        self.size = self.offset + n * dim * 2
        self.keys: list[str | None] = [None] * n
        self.fd = os.open(self.tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        _lock(self.fd)
        try:
            self._reserve()
            os.pwrite(self.fd, header.getvalue(), 0)
        except BaseException:
            self.abort()
            raise

    def _reserve(self) -> None:
        """Claim the shard's blocks now: a full disk fails here, before any work, not mid-write."""
        try:
            os.posix_fallocate(self.fd, 0, self.size)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise disk_full(self.cache.dir, self.size, f"a shard of {self.n} rows x {self.dim}") from e
            if shutil.disk_usage(self.cache.dir).free < self.size:  # no fallocate here: check instead
                raise disk_full(self.cache.dir, self.size, f"a shard of {self.n} rows x {self.dim}") from e
        except AttributeError:  # no posix_fallocate on this platform
            if shutil.disk_usage(self.cache.dir).free < self.size:
                raise disk_full(self.cache.dir, self.size, f"a shard of {self.n} rows x {self.dim}") from None

    def _write(self, data: bytes, at: int) -> None:
        try:
            os.pwrite(self.fd, data, at)
        except OSError as e:
            if e.errno in FULL:
                self.abort()
                raise disk_full(self.cache.dir, self.size, f"a shard of {self.n} rows x {self.dim}") from e
            raise

    def put(self, rows: list[int], keys: list[str], feats: np.ndarray) -> None:
        """Write a batch of feature rows (runs of consecutive rows in one write each)."""
        data = np.ascontiguousarray(feats, dtype="<f2")
        row_bytes = self.dim * 2
        start = 0
        for i in range(1, len(rows) + 1):
            if i == len(rows) or rows[i] != rows[i - 1] + 1:
                self._write(data[start:i].tobytes(), self.offset + rows[start] * row_bytes)
                start = i
        for r, k in zip(rows, keys, strict=True):
            self.keys[r] = k

    def finish(self) -> tuple[str, list[int]]:
        """Flush, checksum, index the filled rows and publish the shard; returns (shard, rows)."""
        os.fsync(self.fd)
        checksum = file_checksum(self.tmp)
        filled = [r for r, k in enumerate(self.keys) if k is not None]
        # rows of files that failed to load stay unindexed (they are retried next time)
        self.cache._publish(self.name, self.tmp, [(self.keys[r], r) for r in filled], self.size, checksum)
        os.close(self.fd)
        self.fd = -1
        return self.name, filled

    def abort(self) -> None:
        """Drop a shard that was not finished."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.tmp.unlink(missing_ok=True)
