"""int8 with and without bias correction, recipe by recipe, on one run's validation images.

    python benchmarks/int8_bias_correction.py RUN [--shares 0,0.05,0.1,0.2] [--calibration-images 128]

RUN must have model.onnx (`headstart export RUN --format onnx`). For each share of the
convolutions kept in float (from the input on, as the gate's fallbacks do), quantizes the model
both ways and prints top-1 agreement with the float model and the int8 accuracy: one run, the same
calibration and validation images for every cell.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from headstart.core.files import MODEL_JSON, read_json
from headstart.data.transforms import Preprocess
from headstart.deploy.quantize import _Graph, _ort_quantization, _Recipe, load_batch, run_outputs
from headstart.inference.logits import split_items


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--shares", default="0,0.05,0.1,0.2", help="shares of the convolutions kept in float")
    ap.add_argument("--calibration-images", type=int, default=128)
    ap.add_argument("--val-images", type=int, default=2000)
    a = ap.parse_args()
    q = _ort_quantization()
    pp = Preprocess.from_dict(read_json(a.run / MODEL_JSON)["preprocessing"])
    calibration, _ = load_batch(split_items(a.run, "train", a.calibration_images), pp)
    x, y = load_batch(split_items(a.run, "val", a.val_images), pp)
    p_float, _ = run_outputs(a.run / "model.onnx", x)
    print(f"{len(y)} validation images, float accuracy {(p_float.argmax(1) == y).mean():.4f}")
    print("kept in float | agreement plain -> bias-corrected | int8 accuracy plain -> bias-corrected")
    with tempfile.TemporaryDirectory() as tmp:
        plain = _Graph.prepare(q, a.run / "model.onnx", calibration, Path(tmp), bias_correction=False)
        graphs = [plain, _Graph(q, plain.pre, calibration, Path(tmp), bias_correction=True)]
        for share in (float(s) for s in a.shares.split(",")):
            recipe = _Recipe(f"first {share:.0%}", "front" if share else "none", share=share)
            cells = []
            for i, graph in enumerate(graphs):
                out = Path(tmp) / f"{share}-{i}.onnx"
                recipe.build(graph, out)
                p, _ = run_outputs(out, x)
                cells.append(((p.argmax(1) == p_float.argmax(1)).mean(), (p.argmax(1) == y).mean()))
            (ag0, acc0), (ag1, acc1) = cells
            print(f"first {share:.0%} | {ag0:.2%} -> {ag1:.2%} | {acc0:.4f} -> {acc1:.4f}", flush=True)


if __name__ == "__main__":
    main()
