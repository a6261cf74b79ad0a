"""Benchmark (c): end-to-end feature extraction from JPEG files: headstart's loader (PIL draft
decoding, workers with prefetch, batches ramping up from 8, fast inference path) vs torchvision
ImageFolder + PIL + default DataLoader + NCHW no_grad. Also the share of wall time the backbone is
busy in headstart's loop.

    PYTHONPATH=src python benchmarks/jpeg_extraction.py [--data DIR] [--limit N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _data import HYMENOPTERA
from torchvision import datasets

from headstart.core.device import configure_threads
from headstart.data.layout import resolve_data
from headstart.data.loading import ImageDataset, make_loader
from headstart.data.transforms import eval_transform
from headstart.models.backbones import create_backbone
from headstart.models.fastpath import inference_batch_size, inference_model
from headstart.training.setup import preprocess_of


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=HYMENOPTERA)
    ap.add_argument("--limit", type=int, default=None, help="first N train images only")
    a = ap.parse_args()
    configure_threads()
    bb = create_backbone("efficientnet_lite0").eval()
    pp = preprocess_of(bb)
    tf = eval_transform(pp)
    items = [it for it in resolve_data(a.data).train if it[0].lower().endswith((".jpg", ".jpeg"))]
    items = items[: a.limit] if a.limit else items

    # baseline: ImageFolder-style PIL loading, default DataLoader (no workers), NCHW fp32 no_grad
    ds = datasets.ImageFolder(Path(items[0][0]).parents[1], tf)
    keep = {p for p, _ in items}
    ds.samples = [s for s in ds.samples if s[0] in keep]
    t = time.perf_counter()
    with torch.no_grad():
        for x, _ in torch.utils.data.DataLoader(ds, batch_size=32):
            bb(x)
    base = time.perf_counter() - t

    # headstart: draft decoding, workers + prefetch, batches ramping up from 8 (as extraction runs),
    # BN-folded channels-last model, inference_mode
    model = inference_model(bb, torch.device("cpu"))
    loader = make_loader(ImageDataset(items, tf, draft=pp.resize_size),
                         batch_size=inference_batch_size(torch.device("cpu")), shuffle=False,
                         ramp=True)  # fmt: skip
    busy, first_wait = 0.0, None
    t = time.perf_counter()
    with torch.inference_mode():
        for batch in loader:
            t0 = time.perf_counter()
            first_wait = t0 - t if first_wait is None else first_wait
            model(batch.x.contiguous(memory_format=torch.channels_last))
            busy += time.perf_counter() - t0
    ours = time.perf_counter() - t
    n = len(items)
    print(f"{n} JPEGs, {torch.get_num_threads()} threads")
    print(f"baseline ImageFolder+DataLoader: {base:.1f}s  {n / base:.1f} img/s")
    print(
        f"headstart loader+fast path:      {ours:.1f}s  {n / ours:.1f} img/s  backbone busy {busy / ours:.0%}"
        f" (of the idle time, {first_wait:.2f}s waited for the first batch)"
    )
    print(f"RATIO {base / ours:.2f}x")


if __name__ == "__main__":
    main()
