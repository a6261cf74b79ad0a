"""Benchmark: `finetune --cache-prefix` vs ordinary fine-tuning on the ant/bee set, one process.

Same backbone (efficientnet_lite0), --unfreeze 2, epochs, seed and optimizer for both. Ordinary
fine-tuning runs the whole backbone on augmented images every epoch (the frozen prefix on the
fast path, features/live_prefix.py); --cache-prefix runs the frozen
prefix once per image (cold cache: its time is included) and then only the last blocks and the
head, with flips of the cached maps as the only augmentation. A second --cache-prefix run shows
the warm-cache cost (every map read back from disk).

    PYTHONPATH=src python benchmarks/finetune_cache_prefix.py [--data DIR] [--epochs 8]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import headstart

ROOT = Path(__file__).resolve().parents[1]


def default_data() -> Path:
    """$HEADSTART_DATA, else shared/data beside the repo (or a parent's), else /work/shared/data."""
    if os.environ.get("HEADSTART_DATA"):
        return Path(os.environ["HEADSTART_DATA"]) / "hymenoptera_data"
    for p in ROOT.parents:
        if (p / "shared" / "data" / "hymenoptera_data").is_dir():
            return p / "shared" / "data" / "hymenoptera_data"
    return Path("/work/shared/data/hymenoptera_data")


def timed_run(data: Path, output: str, **options) -> tuple[float, dict]:
    t = time.perf_counter()
    r = headstart.train(data, output=output, **options)
    return time.perf_counter() - t, r.results.to_dict()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=default_data())
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    common = dict(strategy="finetune", unfreeze=2, epochs=a.epochs, seed=a.seed, overwrite=True)
    with tempfile.TemporaryDirectory() as tmp:
        cache = f"{tmp}/cache"  # a fresh cache: the first --cache-prefix run computes every map
        t_ft, ft = timed_run(a.data, f"{tmp}/ft", cache_dir=cache, **common)
        t_cold, cold = timed_run(a.data, f"{tmp}/cp", cache_dir=cache, cache_prefix=True, **common)
        t_warm, warm = timed_run(a.data, f"{tmp}/cp2", cache_dir=cache, cache_prefix=True, **common)
    shape = "x".join(map(str, cold["prefix_map_shape"]))
    print(f"ant/bee, efficientnet_lite0, --unfreeze 2, {a.epochs} epochs, seed {a.seed}, "
          f"split at {cold['prefix_split']} ({shape} maps)")  # fmt: skip
    print(f"finetune:                     {t_ft:7.1f}s wall (loop {ft['train_loop_seconds']:.1f}s)  "
          f"val acc {ft['val_accuracy']:.4f}")  # fmt: skip
    print(f"finetune --cache-prefix cold: {t_cold:7.1f}s wall (prefix {cold['extract_seconds']:.1f}s, "
          f"loop {cold['train_loop_seconds']:.1f}s)  val acc {cold['val_accuracy']:.4f}  "
          f"hit rate {cold['cache_hit_rate']:.0%}")  # fmt: skip
    print(f"finetune --cache-prefix warm: {t_warm:7.1f}s wall (prefix {warm['extract_seconds']:.1f}s, "
          f"loop {warm['train_loop_seconds']:.1f}s)  val acc {warm['val_accuracy']:.4f}  "
          f"hit rate {warm['cache_hit_rate']:.0%}")  # fmt: skip
    print(f"RATIO cold {t_ft / t_cold:.2f}x, warm {t_ft / t_warm:.2f}x faster than ordinary finetune "
          f"(wall); per-epoch loop {ft['train_loop_seconds'] / cold['train_loop_seconds']:.2f}x")  # fmt: skip
    print(f"frozen tensors changed: finetune {ft['frozen_tensors_changed']}, "
          f"cache-prefix {cold['frozen_tensors_changed']}/{cold['frozen_tensors_checked']}")  # fmt: skip


if __name__ == "__main__":
    main()
