"""Benchmark (e): peak RSS while extracting CIFAR-10 train (50k JPEGs) into the feature cache,
minus the RSS with the model loaded. Unpacks cifar10.tar.gz to ~/.cache/headstart/data once.

    PYTHONPATH=src python benchmarks/cifar_rss.py [--tar ../shared/data/cifar10.tar.gz] [--limit N]
"""

from __future__ import annotations

import argparse
import os
import resource
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from _data import CIFAR_TAR

from headstart.core.device import configure_threads
from headstart.data.layout import scan_tree
from headstart.data.transforms import eval_transform
from headstart.features.cache import FeatureCache
from headstart.features.engine import EngineSource, choose_engine
from headstart.features.extract import extract_features
from headstart.models.backbones import create_backbone
from headstart.training.setup import preprocess_of


def rss_mib() -> float:
    """Current resident set size of this process (MiB)."""
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tar", default=CIFAR_TAR)
    ap.add_argument("--limit", type=int, default=None)
    a = ap.parse_args()
    root = Path(os.path.expanduser("~/.cache/headstart/data"))
    if not (root / "cifar10" / "train").is_dir():
        root.mkdir(parents=True, exist_ok=True)
        with tarfile.open(a.tar) as tf:
            tf.extractall(root, filter="data")
    configure_threads()
    bb = create_backbone("efficientnet_lite0").eval()
    pp = preprocess_of(bb)
    items = scan_tree(root / "cifar10" / "train").items
    items = items[: a.limit] if a.limit else items
    base = rss_mib()
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cpu = torch.device("cpu")
        engine = EngineSource(choose_engine("auto", cpu, len(items)), bb, pp, cpu, key={"rss": 1},
                              store=Path(tmp) / "engines")  # fmt: skip
        f = extract_features(items, eval_transform(pp, uint8=True), engine=engine, dim=bb.feature_dim,
                             device=cpu, draft=pp.resize_size, cache=FeatureCache(tmp, "rss"))  # fmt: skip
    secs = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"{len(items)} images in {secs:.0f}s ({len(items) / secs:.1f} img/s, {engine.record['name']}), "
          f"features {f.x.shape}")  # fmt: skip
    print(f"RSS with model {base:.0f} MiB, peak {peak:.0f} MiB (+{peak - base:.0f} MiB), "
          f"largest loader worker peak {workers:.0f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
