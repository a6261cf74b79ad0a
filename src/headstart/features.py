"""Pooled features from a frozen backbone: one forward pass per image, whatever the head epochs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch.utils.data import Subset
from tqdm.auto import tqdm

from headstart.backbones import Backbone
from headstart.data import ImageDataset, Skipped, make_loader
from headstart.device import autocast_for, to_device


@dataclass
class Features:
    """Features [N, D] (float32, CPU), their labels and item indices, and the files that failed."""

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor
    failed: list[Skipped] = field(default_factory=list)
    seconds: float = 0.0


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
) -> Features:
    """Run the backbone once over `items` (or the indices in `subset`) in eval mode."""
    backbone.eval()
    ds = ImageDataset(items, transform, draft=draft)
    if subset is not None:
        ds = Subset(ds, list(subset))
    loader = make_loader(
        ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )  # fmt: skip
    xs, ys, idx, failed = [], [], [], []
    start = time.perf_counter()
    with tqdm(total=len(ds), desc=desc, unit="img", leave=False, disable=None) as bar:
        for batch in loader:
            failed += [Skipped(items[i][0], why) for i, why in batch.failed]
            if batch.x is not None:
                with autocast_for(device):
                    f = backbone(to_device(batch.x, device))
                xs.append(f.float().cpu())
                ys.append(batch.y)
                idx.append(batch.index)
            bar.update(len(batch.y) + len(batch.failed))
    dim = backbone.feature_dim
    return Features(
        x=torch.cat(xs) if xs else torch.empty(0, dim),
        y=torch.cat(ys) if ys else torch.empty(0, dtype=torch.long),
        index=torch.cat(idx) if idx else torch.empty(0, dtype=torch.long),
        failed=failed,
        seconds=time.perf_counter() - start,
    )
