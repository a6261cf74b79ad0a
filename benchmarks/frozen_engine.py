"""Benchmark (c), extended: end-to-end frozen extraction (JPEG files -> features) before and after the
frozen engine, and the accuracy each engine's features give. One run, same images, quiet machine.

1. speed on the first --limit images (train, then val), each path from files to features:
   - before: float transform (PIL resize) in the loader workers + the PyTorch fast path (headstart
     before the frozen engine and the uint8-tensor preprocessing)
   - torch:  uint8 transform + PyTorch fast path, normalised in the engine
   - onnxruntime: uint8 transform + ONNX Runtime (export and parity check included, counted once)
2. accuracy: `headstart train DATA --strategy extract` with --frozen-engine torch and onnxruntime,
   each into a fresh cache; val accuracy of both and the difference in points.

    PYTHONPATH=src python benchmarks/frozen_engine.py [DATA ...] [--limit N] [--no-accuracy]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _data import HYMENOPTERA
from _lite0 import frozen_lite0
from _pil import pil_eval

from headstart.data.layout import resolve_data
from headstart.data.loading import ImageDataset, make_loader
from headstart.data.transforms import eval_transform
from headstart.features.engine import EngineChoice, EngineSource
from headstart.features.extract import extract_features
from headstart.models.fastpath import inference_model
from headstart.training.run import train

CPU = torch.device("cpu")


def before(bb, pp, items) -> float:
    """Seconds for the path headstart took until the frozen engine: float tensors from the workers
    (resized on PIL, as until 2026-12-07), PyTorch."""
    net = inference_model(bb, CPU)
    loader = make_loader(ImageDataset(items, pil_eval(pp, uint8=False), draft=pp.resize_size), batch_size=64,
                         shuffle=False, ramp=True)  # fmt: skip
    t = time.perf_counter()
    with torch.inference_mode():
        for batch in loader:
            net(batch.x.contiguous(memory_format=torch.channels_last))
    return time.perf_counter() - t


def now(bb, pp, items, engine: str, store: Path) -> tuple[float, dict]:
    """Seconds for extract_features on `engine` (the export counted if `store` does not hold it)."""
    source = EngineSource(EngineChoice(engine, strict=True), bb, pp, CPU, key={"bench": engine}, store=store)
    t = time.perf_counter()
    extract_features(items, eval_transform(pp, uint8=True), engine=source, dim=bb.feature_dim,
                     device=CPU, draft=pp.resize_size, desc=engine)  # fmt: skip
    return time.perf_counter() - t, source.record


def accuracy(data: str, engine: str) -> tuple[float, float]:
    """Val accuracy of an extract run on `engine`, and its extraction rate (img/s)."""
    with tempfile.TemporaryDirectory() as tmp:
        r = train(data, output=Path(tmp) / "run", strategy="extract", frozen_engine=engine,
                  cache_dir=str(Path(tmp) / "cache"))  # fmt: skip
        return r["val_accuracy"], r["features_extracted"] / r["extract_seconds"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", nargs="*", default=[HYMENOPTERA])
    ap.add_argument("--limit", type=int, default=1500, help="images for the speed part")
    ap.add_argument("--no-accuracy", action="store_true")
    a = ap.parse_args()
    threads, bb, pp = frozen_lite0()
    for data in a.data:
        split = resolve_data(data)
        items = (split.train + split.val)[: a.limit]
        base = before(bb, pp, items)
        with tempfile.TemporaryDirectory() as tmp:
            t_torch, _ = now(bb, pp, items, "torch", Path(tmp))
            t_cold, rec = now(bb, pp, items, "onnxruntime", Path(tmp))  # exports into tmp
            t_warm, _ = now(bb, pp, items, "onnxruntime", Path(tmp))
        n = len(items)
        print(f"{data}: {n} images, {threads} threads")
        print(f"  before (float PIL loader + PyTorch):    {n / base:6.1f} img/s")
        print(f"  torch engine (uint8 loader):            {n / t_torch:6.1f} img/s  {base / t_torch:.2f}x")
        print(f"  onnxruntime, export included (first):   {n / t_cold:6.1f} img/s  {base / t_cold:.2f}x "
              f"(export {t_cold - t_warm:.1f}s)")  # fmt: skip
        print(f"  onnxruntime, exported before:           {n / t_warm:6.1f} img/s  {base / t_warm:.2f}x "
              f"(parity max diff {rec['parity_max_abs_diff']:.1e})")  # fmt: skip
        print(f"RATIO onnxruntime/before {base / t_warm:.2f}x (exported), {base / t_cold:.2f}x (with export)")
        if not a.no_accuracy:
            acc_t, rate_t = accuracy(data, "torch")
            acc_o, rate_o = accuracy(data, "onnxruntime")
            print(f"  extract run, val accuracy: torch {acc_t:.4f} ({rate_t:.1f} img/s), onnxruntime "
                  f"{acc_o:.4f} ({rate_o:.1f} img/s): {100 * (acc_o - acc_t):+.2f} points")  # fmt: skip


if __name__ == "__main__":
    main()
