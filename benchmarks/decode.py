"""Decoding and preprocessing: PIL transforms (what headstart used until 2026-12-07) against
torchvision's v2 transforms on uint8 tensors (what it uses now), on the same image files.

    python benchmarks/decode.py FOLDER [--limit 400] [--size 224]

Prints, per pipeline: the transform alone (ms per image, one thread, images already decoded),
decode + transform (ms per image), and the loader's end-to-end images/s as extraction runs it
(DataLoader workers decoding into uint8 batches); then the ratios, and how far apart the pixels
are (max and mean absolute difference, share of pixels that differ).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _pil import pil_eval


def per_image(tf, images: list) -> float:
    """ms per image of tf over the images (after one warm-up)."""
    tf(images[0])
    t = time.perf_counter()
    for im in images:
        tf(im)
    return (time.perf_counter() - t) / len(images) * 1000


def loader_rate(items, tf, pp, workers: int | None) -> float:
    """Images/s of the loader alone, decoding and transforming into uint8 batches of 64."""
    from headstart.data.loading import ImageDataset, make_loader

    loader = make_loader(ImageDataset(items, tf, draft=pp.resize_size), batch_size=64, shuffle=False,
                         num_workers=workers)  # fmt: skip
    t, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch.y)
    return n / (time.perf_counter() - t)


def main() -> None:
    """Time both pipelines and print the ratios."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--limit", type=int, default=400)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--workers", type=int, default=None)
    a = ap.parse_args()

    from headstart.data.images import load_image
    from headstart.data.layout import expand_inputs
    from headstart.data.transforms import Preprocess, eval_transform

    pp = Preprocess(a.size, (0.5,) * 3, (0.5,) * 3)
    paths = sorted(expand_inputs([a.folder])[0])
    paths = paths[:: max(1, len(paths) // a.limit)][: a.limit]
    decoded = [load_image(p, draft=pp.resize_size) for p in paths]
    now, before = eval_transform(pp, uint8=True), pil_eval(pp, uint8=True)
    pipelines = {"uint8 tensors (now)": now, "PIL (before)": before}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = {}
    for name, tf in pipelines.items():
        rows[name] = (
            per_image(tf, decoded),
            per_image(lambda p, tf=tf: tf(load_image(p, draft=pp.resize_size)), paths),
        )
    torch.set_num_threads(threads)
    items = [(p, 0) for p in paths]
    for name, tf in pipelines.items():  # twice each, alternating: load from other processes falls on both
        rates = [loader_rate(items, tf, pp, a.workers) for _ in range(2)]
        rows[name] += (max(rates),)
    print(f"{len(paths)} images from {a.folder}, {a.size} px (resize {pp.resize_size}, {pp.interpolation})")
    for name, (tf_ms, both_ms, rate) in rows.items():
        print(f"{name:22s} transform {tf_ms:5.2f} ms/img   decode+transform {both_ms:5.2f} ms/img   "
              f"loader {rate:6.1f} img/s")  # fmt: skip
    (n_tf, n_both, n_rate), (o_tf, o_both, o_rate) = rows.values()
    print(f"ratio (now/before): transform {o_tf / n_tf:.2f}x faster, "
          f"decode+transform {o_both / n_both:.2f}x, loader {n_rate / o_rate:.2f}x")  # fmt: skip
    diffs = [(now(im).int() - before(im).int()).abs() for im in decoded]
    worst = max(int(d.max()) for d in diffs)
    mean = np.mean([float(d.float().mean()) for d in diffs])
    differ = np.mean([float((d > 0).float().mean()) for d in diffs])
    print(f"pixels: max |diff| {worst} of 255, mean {mean:.4f}, {differ:.2%} differ")


if __name__ == "__main__":
    main()
