"""Cost of verifying the feature cache (per-shard size + checksum on first read) on a warm,
CIFAR-10-sized cache: 50,000 + 10,000 rows of 1,280 float16 features, as lite0 extraction leaves.

    python benchmarks/cache_verify.py [--rows 50000 10000] [--dim 1280]

Times, in one process and on the same files, a warm lookup + read of every row with verification
(what every run does) against the same without it, and prints the ratio. The OS page cache is warm
for both (the files were just written), as on a machine that reads its cache every run.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from headstart.features.cache import FeatureCache


def fill(root: str, rows: list[int], dim: int) -> list[list[str]]:
    cache, keys = FeatureCache(root, "k"), []
    rng = np.random.default_rng(0)
    for s, n in enumerate(rows):
        w = cache.writer(n, dim)
        ks = [f"/data/{s}/{i}.jpg|1|1|0" for i in range(n)]
        for start in range(0, n, 4096):  # as extraction streams batches
            stop = min(n, start + 4096)
            w.put(
                list(range(start, stop)), ks[start:stop], rng.standard_normal((stop - start, dim), np.float32)
            )
        w.finish()
        keys.append(ks)
    cache.close()
    return keys


def warm_read(root: str, keys: list[list[str]], dim: int, *, verify: bool) -> float:
    t = time.perf_counter()
    cache = FeatureCache(root, "k")
    if not verify:
        cache.verify = lambda shard: True  # type: ignore[method-assign]
    for ks in keys:
        hits = cache.lookup(ks)
        cache.read([hits[k] for k in ks], dim)
    cache.close()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[50_000, 10_000])
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as root:
        keys = fill(root, a.rows, a.dim)
        mb = sum(a.rows) * a.dim * 2 / 1e6
        plain = min(warm_read(root, keys, a.dim, verify=False) for _ in range(a.reps))
        checked = min(warm_read(root, keys, a.dim, verify=True) for _ in range(a.reps))
    print(f"warm cache: {sum(a.rows):,} rows x {a.dim} float16 ({mb:.0f} MB in {len(a.rows)} shards)")
    print(f"lookup + read, no verification:   {plain:.2f}s")
    extra = f"(+{checked - plain:.2f}s, RATIO {checked / plain:.2f}x)"
    print(f"lookup + read, with verification: {checked:.2f}s   {extra}")


if __name__ == "__main__":
    main()
