"""Benchmark (a): headstart extract (features once, cached, + N head epochs) vs the tutorial loop
that pushes every image through the frozen backbone in every epoch. One process, same data/model.

    PYTHONPATH=src python benchmarks/extract_vs_epoch_forward.py [--data DIR] [--epochs 10] [--limit N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _data import HYMENOPTERA
from torch import nn
from torchvision import datasets

import headstart
from headstart.data.transforms import eval_transform
from headstart.models.backbones import create_backbone
from headstart.training.setup import preprocess_of

DEFAULT_DATA = HYMENOPTERA


def naive(data: Path, epochs: int, limit: int | None, seed: int = 0) -> tuple[float, float]:
    """Tutorial style: ImageFolder + default DataLoader, frozen backbone forward every epoch."""
    torch.manual_seed(seed)
    bb = create_backbone("efficientnet_lite0").eval()
    for p in bb.parameters():
        p.requires_grad_(False)
    tf = eval_transform(preprocess_of(bb))
    tr = datasets.ImageFolder(data / "train", tf, is_valid_file=lambda p: not p.endswith(".gif"))
    va = datasets.ImageFolder(data / "val", tf)
    if limit:
        tr = torch.utils.data.Subset(tr, torch.randperm(len(tr))[:limit].tolist())
        va = torch.utils.data.Subset(va, torch.randperm(len(va))[:limit].tolist())
    dl = torch.utils.data.DataLoader(tr, batch_size=32, shuffle=True)
    dv = torch.utils.data.DataLoader(va, batch_size=32)
    head = nn.Linear(bb.feature_dim, 2)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    t = time.perf_counter()
    best = 0.0
    for _ in range(epochs):
        head.train()
        for x, y in dl:
            with torch.no_grad():
                f = bb(x)
            loss = nn.functional.cross_entropy(head(f), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        head.eval()
        correct = n = 0
        with torch.no_grad():
            for x, y in dv:
                correct += (head(bb(x)).argmax(1) == y).sum().item()
                n += len(y)
        best = max(best, correct / n)
    return time.perf_counter() - t, best


def subset_tree(data: Path, limit: int, out: Path) -> Path:
    """Symlinked train/val subset of `limit` images per split (same seed as the naive subset)."""
    for split in ("train", "val"):
        ds = datasets.ImageFolder(data / split, is_valid_file=lambda p: not p.endswith(".gif"))
        torch.manual_seed(0) if split == "train" else None
        idx = torch.randperm(len(ds))[:limit].tolist()
        for i in idx:
            src = Path(ds.samples[i][0])
            dst = out / split / src.parent.name / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--limit", type=int, default=None, help="images per split (quick run)")
    a = ap.parse_args()
    data = Path(a.data)
    with tempfile.TemporaryDirectory() as tmp:
        src = subset_tree(data, a.limit, Path(tmp) / "d") if a.limit else data
        t = time.perf_counter()
        r = headstart.train(src, output=f"{tmp}/run", epochs=a.epochs, cache_dir=f"{tmp}/cache")
        ours = time.perf_counter() - t
        t = time.perf_counter()
        r2 = headstart.train(src, output=f"{tmp}/run2", epochs=a.epochs, cache_dir=f"{tmp}/cache")
        ours_warm = time.perf_counter() - t
    base, base_acc = naive(data, a.epochs, a.limit)
    print(f"headstart extract (cold cache): {ours:.1f}s  val acc {r['val_accuracy']:.4f}")
    print(f"headstart extract (warm cache): {ours_warm:.1f}s  hit rate {r2['cache_hit_rate']:.2f}")
    print(f"naive forward-every-epoch:      {base:.1f}s  val acc {base_acc:.4f}")
    print(f"RATIO cold {base / ours:.2f}x  warm {base / ours_warm:.2f}x  "
          f"acc diff {100 * (r['val_accuracy'] - base_acc):+.1f} points")  # fmt: skip


if __name__ == "__main__":
    main()
