"""int8 vs float ONNX vs the PyTorch fast path, on the same validation images, in one run.

    python benchmarks/int8.py RUN [--seconds 5] [--min-agreement 0.99 --max-drop 0.5] [--no-bias-correction]

Exports RUN/model.onnx and RUN/model.int8.onnx (through the accuracy gate), then measures each
engine model-only (a batch of 32 preprocessed images already in memory, rounds interleaved so a
busy machine slows them alike) and prints images/s, ratios, file sizes and validation accuracy.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torchvision import transforms as T

from headstart.deploy.export import export
from headstart.deploy.quantize import load_batch, run_model
from headstart.inference.logits import split_items
from headstart.inference.onnx import INPUT_NAME, onnx_session
from headstart.inference.predictor import load


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--seconds", type=float, default=5.0, help="per engine and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--min-agreement", type=float, default=0.99, help="the gate (loosen to measure a refused model)"
    )
    ap.add_argument("--max-drop", type=float, default=0.5)
    ap.add_argument("--no-bias-correction", action="store_true", help="int8 weights without bias correction")
    a = ap.parse_args()
    t = time.perf_counter()
    gate = {"min_agreement": a.min_agreement, "max_drop": a.max_drop}
    gate["bias_correction"] = not a.no_bias_correction
    r = export(a.run, format="onnx", quantize="int8", gate=gate)
    print(f"export + int8 gate: {time.perf_counter() - t:.0f}s; recipe: {r.int8.attempts[-1].describe()}")
    predictor = load(a.run, device="cpu")
    x, y = load_batch(split_items(a.run, "val", 2000), predictor.preprocess)
    norm = T.Normalize(predictor.preprocess.mean, predictor.preprocess.std)
    batch = torch.from_numpy(x[:32])
    sessions = {"onnx float": onnx_session(r.path), "onnx int8": onnx_session(r.int8.path)}
    runners = {
        "pytorch fast path": lambda: predictor.logits_tensor(norm(batch)),
        **{k: (lambda s=s: s.run(None, {INPUT_NAME: x[:32]})) for k, s in sessions.items()},
    }
    counts = {k: [0, 0.0] for k in runners}
    for _ in range(a.rounds):
        for k, fn in runners.items():
            fn()
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < a.seconds:
                fn()
                counts[k][0] += len(batch)
            counts[k][1] += time.perf_counter() - t0
    speed = {k: n / s for k, (n, s) in counts.items()}
    pt = np.concatenate(
        [
            predictor.predict_tensor(norm(torch.from_numpy(x[i : i + 64]))).numpy()
            for i in range(0, len(x), 64)
        ]
    )
    acc = {
        "pytorch fast path": float((pt.argmax(1) == y).mean()),
        "onnx float": float((run_model(r.path, x).argmax(1) == y).mean()),
        "onnx int8": float((run_model(r.int8.path, x).argmax(1) == y).mean()),
    }
    size = {"onnx float": r.path.stat().st_size, "onnx int8": r.int8.path.stat().st_size}
    print(f"{a.run}: {len(y)} validation images, batch 32, {a.rounds}x{a.seconds:.0f}s per engine")
    for k in runners:
        mb = f"{size[k] / 1e6:6.1f} MB" if k in size else "       -"
        print(f"  {k:<18} {speed[k]:8.1f} img/s  {mb}  val acc {acc[k]:.4f}")
    print(f"int8 / onnx float: {speed['onnx int8'] / speed['onnx float']:.2f}x images/s, "
          f"{size['onnx float'] / size['onnx int8']:.2f}x smaller; int8 / pytorch fast path: "
          f"{speed['onnx int8'] / speed['pytorch fast path']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
