"""ONNX Runtime vs PyTorch prediction speed on the same images, in one process.

    python benchmarks/predict_throughput.py RUN FOLDER [--limit 2000] [--batch-size 32] [--chunk 500]

RUN needs model.safetensors (PyTorch) and model.onnx (`headstart export RUN`; exported here if
missing). Prints, for both engines: end-to-end images/s (decode in DataLoader workers + resize/crop
+ model, as `headstart predict --csv` does) and model-only images/s on the same preprocessed
batches, then the ONNX/PyTorch ratios. Engines alternate chunk by chunk so that load from other
processes on a shared machine falls on both alike; top-1 agreement is checked on every image.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch


def main() -> None:
    """Run the comparison and print the ratios."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("folder")
    ap.add_argument("--limit", type=int, default=2000, help="images (0 = all)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=500, help="images per alternation")
    ap.add_argument("--workers", type=int, default=None)
    a = ap.parse_args()

    import headstart
    from headstart.data.layout import expand_inputs
    from headstart.inference.onnx import load_onnx

    if not os.path.exists(os.path.join(a.run, "model.onnx")):
        from headstart.deploy.export import export

        print(export(a.run, format="onnx").parity.describe())
    paths, _ = expand_inputs([a.folder])
    paths = paths[: a.limit] if a.limit else paths
    # "torch" is headstart's predict (BN-folded channels-last fast path); "torch-plain" the stored
    # model run as trained (NCHW, BatchNorm), i.e. what predict did before the fast path
    engines = {
        "torch": headstart.load(a.run, device="cpu"),
        "torch-plain": headstart.load(a.run, device="cpu", fast=False),
        "onnx": load_onnx(a.run),
    }
    print(f"{len(paths)} images from {a.folder}; torch threads {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")  # fmt: skip

    e2e = dict.fromkeys(engines, 0.0)
    labels: dict[str, list] = {k: [] for k in engines}
    for i in range(0, len(paths), a.chunk):
        chunk = paths[i : i + a.chunk]
        for name, pred in engines.items():
            t = time.perf_counter()
            out = list(pred.iter_predict(chunk, batch_size=a.batch_size, num_workers=a.workers))
            e2e[name] += time.perf_counter() - t
            labels[name] += [p.label for p in out]

    # model only: the same preprocessed batches through both engines
    tf = engines["onnx"].transform
    from headstart.data.images import load_image

    xs = torch.stack([tf(load_image(p, draft=engines["onnx"].preprocess.resize_size)) for p in paths[:256]])
    norm = __import__("torchvision").transforms.Normalize(engines["torch"].preprocess.mean,
                                                          engines["torch"].preprocess.std)  # fmt: skip
    model_s = dict.fromkeys(engines, 0.0)
    for _ in range(2):
        for name, pred in engines.items():
            t = time.perf_counter()
            for j in range(0, len(xs), a.batch_size):
                xb = xs[j : j + a.batch_size]
                pred.predict_tensor(xb if name == "onnx" else norm(xb))
            model_s[name] += time.perf_counter() - t

    n = len(paths)
    agree = np.mean([x == y for x, y in zip(labels["torch"], labels["onnx"], strict=True)])
    for name in engines:
        rate, model_rate = n / e2e[name], 2 * len(xs) / model_s[name]
        print(f"{name:11s} end-to-end {rate:7.1f} img/s   model-only {model_rate:7.1f} img/s")
    print(f"top-1 agreement onnx vs torch: {agree:.2%} of {n}")
    print(f"ratio onnx/torch end-to-end: {e2e['torch'] / e2e['onnx']:.2f}x")
    print(f"ratio onnx/torch model-only: {model_s['torch'] / model_s['onnx']:.2f}x")
    fast_e2e, fast_model = e2e["torch-plain"] / e2e["torch"], model_s["torch-plain"] / model_s["torch"]
    print(f"ratio torch/torch-plain (the fast path in predict): end-to-end {fast_e2e:.2f}x, "
          f"model-only {fast_model:.2f}x")  # fmt: skip
    print(f"load average after: {os.getloadavg()[0]:.1f} (machine shared with other processes)")


if __name__ == "__main__":
    main()
