"""Benchmark (b): backbone img/s on pre-decoded tensors, headstart's inference path and the
variants tried, vs a plain NCHW fp32 `torch.no_grad` loop, same batch. Interleaved repeats, median.

    PYTHONPATH=src python benchmarks/backbone_throughput.py [--backbone efficientnet_lite0] [--reps 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from headstart.core.device import configure_threads, pick_device
from headstart.models.backbones import create_backbone
from headstart.models.fastpath import inference_model


def rate(fn, x, n) -> float:
    fn(x)
    t = time.perf_counter()
    for _ in range(n):
        fn(x)
    return n * x.shape[0] / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    threads = configure_threads()
    dev = pick_device("auto")
    bb = create_backbone(a.backbone, weights="none").eval().to(dev)
    s = bb.config.input_size
    x = torch.randn(a.batch_size, 3, s, s, device=dev)
    base_model = copy.deepcopy(bb)

    def baseline(x):
        with torch.no_grad():
            return base_model(x)

    fast = inference_model(bb, dev)
    xcl = x.contiguous(memory_format=torch.channels_last)

    def headstart_path(_x):
        with torch.inference_mode():
            return fast(xcl)

    cl = copy.deepcopy(bb).to(memory_format=torch.channels_last)

    def channels_last(_x):
        with torch.inference_mode():
            return cl(xcl)

    variants = {
        "baseline no_grad NCHW": baseline,
        "headstart": headstart_path,
        "channels_last": channels_last,
    }
    from headstart.models.fastpath import fold_batchnorm

    folded = copy.deepcopy(bb)
    fold_batchnorm(folded)

    def bn_folded_nchw(x):
        with torch.inference_mode():
            return folded(x)

    variants["bn folded NCHW"] = bn_folded_nchw
    with torch.inference_mode():
        err = (fast(xcl) - base_model(x)).abs().max().item()
    print(f"headstart path max |feature diff| vs baseline: {err:.2e}")
    got: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(a.reps):
        for k, fn in variants.items():
            got[k].append(rate(fn, x, a.batches))
    med = {k: statistics.median(v) for k, v in got.items()}
    print(f"{a.backbone} on {dev}, {threads} threads, batch {a.batch_size}, {s}px, median of {a.reps}")
    for k, v in med.items():
        print(f"{k:<24} {v:8.1f} img/s   RATIO {v / med['baseline no_grad NCHW']:.2f}x   runs {got[k]}")


if __name__ == "__main__":
    main()
