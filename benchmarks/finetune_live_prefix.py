"""Benchmark: fine-tuning on augmented images, the whole model under autograd (the path before
features/live_prefix.py) against the frozen prefix on the fast path, PyTorch and ONNX Runtime, in
one process. Same backbone (efficientnet_lite0), --unfreeze 2, epochs, seed, augmentation and
optimizer; the whole-model run goes first and last, so drift of the machine shows. Each run has
its own empty cache: ONNX Runtime's time includes its export.

    PYTHONPATH=src python benchmarks/finetune_live_prefix.py [DATA] [--epochs 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from _data import HYMENOPTERA

import headstart
from headstart.training.strategies import inputs


def timed_run(data: str, output: str, *, whole: bool, **options) -> dict:
    """One training run: wall seconds, per-epoch seconds and what results.json says."""
    live = inputs.live_prefix
    if whole:  # the path before the live prefix: the whole model trains on float images
        inputs.live_prefix = lambda *a, **k: None
    try:
        t = time.perf_counter()
        r = headstart.train(data, output=output, **options)
        wall = time.perf_counter() - t
    finally:
        inputs.live_prefix = live
    d = r.results.to_dict()
    epochs = [m["seconds"] for m in r.metrics]
    return d | {"wall": wall, "epoch_median": statistics.median(epochs), "epoch_first": epochs[0],
                "last_train_loss": r.metrics[-1]["train_loss"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", nargs="?", default=HYMENOPTERA)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--unfreeze", type=int, default=2)
    a = ap.parse_args()
    common = dict(strategy="finetune", unfreeze=a.unfreeze, epochs=a.epochs, seed=0, overwrite=True)
    runs = [
        ("whole model", True, "torch"),
        ("live prefix, PyTorch", False, "torch"),
        ("live prefix, ONNX Runtime", False, "onnxruntime"),
        ("whole model again", True, "torch"),
    ]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, whole, engine) in enumerate(runs):
            out[name] = timed_run(a.data, f"{tmp}/r{i}", whole=whole, frozen_engine=engine,
                                  cache_dir=f"{tmp}/cache{i}", **common)  # fmt: skip
    base = out["whole model"]
    print(f"{a.data}: efficientnet_lite0, --unfreeze {a.unfreeze}, {a.epochs} epochs, "
          f"{base['num_train']} train / {base['num_val']} val images")  # fmt: skip
    print(f"{'':27s} {'wall':>7s} {'epoch':>7s} {'1st':>6s} {'val acc':>8s} {'train loss':>10s}  engine")
    for name, d in out.items():
        engine = (d.get("frozen_engine") or {}).get("name", "-")
        print(f"{name:27s} {d['wall']:6.1f}s {d['epoch_median']:6.1f}s {d['epoch_first']:5.1f}s "
              f"{d['val_accuracy']:8.4f} {d['last_train_loss']:10.4f}  {engine}")  # fmt: skip
    ref = (base["epoch_median"] + out["whole model again"]["epoch_median"]) / 2
    for name in ("live prefix, PyTorch", "live prefix, ONNX Runtime"):
        d = out[name]
        print(f"RATIO {name}: {ref / d['epoch_median']:.2f}x per epoch (median; against the mean of the "
              f"two whole-model runs), {base['wall'] / d['wall']:.2f}x wall against the first")  # fmt: skip
    changed = ", ".join(f"{n} {d['frozen_tensors_changed']}" for n, d in out.items())
    print(f"frozen tensors changed: {changed}")


if __name__ == "__main__":
    main()
