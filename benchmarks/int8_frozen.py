"""Would int8 pay for frozen work? lite0's frozen feature extractor in float and in int8 (ONNX
Runtime, static per-channel QDQ, bias-corrected: the recipe of `export --quantize int8`), in one run:

1. end to end, JPEG files -> pooled features on the first --limit images, float and int8 taking
   turns twice (decode in loader workers, the engine in this process, as extraction runs);
2. accuracy: a logistic regression fitted on the training split's features, scored on the
   validation split, with both features from float, both from int8 (what an int8 extraction
   would train and serve), and each head served on the other engine's features (a model trained
   on int8 features, deployed on float, and the reverse);
3. how alike the features are (cosine similarity to float, per validation image).

    PYTHONPATH=src python benchmarks/int8_frozen.py [DATA ...] [--limit N] [--calibration N]

DATA is a folder with train/ and val/ (or test/) class folders; the ant/bee set by default.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from _data import HYMENOPTERA
from _lite0 import frozen_lite0
from sklearn.linear_model import LogisticRegression

from headstart.data.layout import resolve_data
from headstart.data.loading import ImageDataset, make_loader
from headstart.data.transforms import eval_transform
from headstart.deploy.quantize import _Graph, _ort_quantization, _Recipe
from headstart.features.engine import export_frozen, ort_session


def images(items, pp, *, ramp: bool = False):
    """uint8 batches [B, 3, S, S] and labels, as the frozen engines receive them."""
    ds = ImageDataset(items, eval_transform(pp, uint8=True), draft=pp.resize_size)
    return make_loader(ds, batch_size=64, shuffle=False, ramp=ramp)


def stacked(items, pp) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*((b.x.numpy(), b.y.numpy()) for b in images(items, pp)), strict=True)
    return np.concatenate(xs), np.concatenate(ys)


def int8_models(float_path: Path, calibration: np.ndarray, tmp: Path) -> dict[str, Path]:
    """The gate's first two recipes: every convolution in int8, and the first 5 % of them in float."""
    graph = _Graph.prepare(_ort_quantization(), float_path, calibration, tmp, bias_correction=True)
    out = {}
    for recipe in (_Recipe("int8"), _Recipe("int8, first 5 % float", "front", share=0.05)):
        out[recipe.name] = tmp / f"{len(out)}.onnx"
        recipe.build(graph, out[recipe.name])
    return out


def features(session, x: np.ndarray) -> np.ndarray:
    return np.concatenate([session.run(None, {"image": x[i : i + 64]})[0] for i in range(0, len(x), 64)])


def float_and_int8(module, pp, split, *, calibration: int, limit: int, key: str):
    """`module` exported float and quantized by the gate's first two recipes, timed end to end on
    the first `limit` images (engines taking turns, twice), and its outputs on train and val:
    (outputs {engine: (train, val)}, best seconds {engine: s}, labels (train, val), images timed,
    calibration images, seconds spent loading them and quantizing)."""
    calib_items = random.Random(0).sample(split.train, min(calibration, len(split.train)))
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"float": export_frozen(module, pp, key={"bench": key}, folder=Path(tmp))}
        t = time.perf_counter()
        paths |= int8_models(paths["float"], stacked(calib_items, pp)[0], Path(tmp))
        quantizing = time.perf_counter() - t
        sessions = {k: ort_session(p) for k, p in paths.items()}
        speed_items = (split.train + split.val)[:limit]
        seconds = {k: [] for k in sessions}
        for name in [*sessions, *sessions]:  # taking turns, twice
            t = time.perf_counter()
            for batch in images(speed_items, pp, ramp=True):
                sessions[name].run(None, {"image": batch.x.numpy()})
            seconds[name].append(time.perf_counter() - t)
        (x_tr, y_tr), (x_va, y_va) = stacked(split.train, pp), stacked(split.val, pp)
        outputs = {k: (features(s, x_tr), features(s, x_va)) for k, s in sessions.items()}
    best = {k: min(v) for k, v in seconds.items()}
    return outputs, best, (y_tr, y_va), len(speed_items), len(calib_items), quantizing


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", nargs="*", default=[HYMENOPTERA])
    ap.add_argument("--limit", type=int, default=1500, help="images for the speed part")
    ap.add_argument("--calibration", type=int, default=256, help="training images to calibrate on")
    a = ap.parse_args()
    threads, bb, pp = frozen_lite0()
    for data in a.data:
        split = resolve_data(data)
        feats, seconds, (y_tr, y_va), n, n_calib, quantizing = float_and_int8(
            bb, pp, split, calibration=a.calibration, limit=a.limit, key="int8_frozen"
        )
        print(f"{data}: {len(split.train)} train / {len(split.val)} val, {threads} threads, "
              f"{n_calib} calibration images (loading them, quantizing both: "
              f"{quantizing:.1f} s)")  # fmt: skip
        base = seconds["float"]
        fit = {k: LogisticRegression(max_iter=3000).fit(f[0], y_tr) for k, f in feats.items()}
        acc_f = float((fit["float"].predict(feats["float"][1]) == y_va).mean())
        for k in feats:
            line = f"  {k:22s} end to end {n / seconds[k]:6.1f} img/s ({base / seconds[k]:.2f}x)"
            if k != "float":
                f_va, g_va = feats["float"][1], feats[k][1]
                cos = (f_va * g_va).sum(1) / (np.linalg.norm(f_va, axis=1) * np.linalg.norm(g_va, axis=1))
                own = float((fit[k].predict(g_va) == y_va).mean())
                mixed = float((fit["float"].predict(g_va) == y_va).mean())
                back = float((fit[k].predict(f_va) == y_va).mean())
                line += (f", val accuracy {own:.4f} ({100 * (own - acc_f):+.2f} points), float-fitted head "
                         f"on these features {mixed:.4f} ({100 * (mixed - acc_f):+.2f}), this head on float "
                         f"features {back:.4f} ({100 * (back - own):+.2f}), cosine to float mean "
                         f"{cos.mean():.3f} min {cos.min():.3f}")  # fmt: skip
            else:
                line += f", val accuracy {acc_f:.4f}"
            print(line)


if __name__ == "__main__":
    main()
