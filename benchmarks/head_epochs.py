"""Head epochs on cached features: a DataLoader serving one sample at a time (the old path) against
batches sliced from the in-memory tensors (headstart's path now), in one process, same order.

    python benchmarks/head_epochs.py [--rows 50000] [--dim 1280] [--epochs 30]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from headstart.core.device import configure_threads
from headstart.data.loading import SlicedBatches, make_loader
from headstart.features.views import FeatureDataset
from headstart.training.checkpoint import ResumableSampler


def epochs(batches_for_epoch, n_epochs: int, dim: int, classes: int) -> tuple[float, float]:
    torch.manual_seed(0)
    head = nn.Linear(dim, classes)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    t = time.perf_counter()
    for epoch in range(1, n_epochs + 1):
        for batch in batches_for_epoch(epoch):
            loss = nn.functional.cross_entropy(head(batch.x), batch.y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return time.perf_counter() - t, float(loss)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=32)
    a = ap.parse_args()
    configure_threads()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(a.rows, a.dim, generator=g).half()
    y = torch.randint(0, a.classes, (a.rows,), generator=g)
    ds = FeatureDataset(x, y, torch.arange(a.rows))
    sampler = ResumableSampler(a.rows, seed=0)
    loader = make_loader(
        ds, batch_size=a.batch_size, shuffle=True, sampler=sampler, num_workers=0, drop_last=True
    )
    sliced = SlicedBatches(ds, sampler, batch_size=a.batch_size, drop_last=True)

    def via(it):
        def batches(epoch):
            sampler.set_epoch(epoch)
            ds.epoch = epoch
            return it

        return batches

    old, loss_old = epochs(via(loader), a.epochs, a.dim, a.classes)
    new, loss_new = epochs(via(sliced), a.epochs, a.dim, a.classes)
    print(f"{a.epochs} head epochs over {a.rows:,} cached {a.dim}-d features, batch {a.batch_size}")
    print(f"DataLoader, one sample at a time: {old:.1f}s (final loss {loss_old:.4f})")
    print(
        f"sliced in-memory batches:         {new:.1f}s (final loss {loss_new:.4f})   RATIO {old / new:.1f}x"
    )


if __name__ == "__main__":
    main()
