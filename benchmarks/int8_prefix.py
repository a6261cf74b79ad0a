"""Would int8 pay for cached prefix maps? lite0's frozen prefix (what `finetune --cache-prefix
--unfreeze 2` caches) on ONNX Runtime in float and in int8 (export's recipe: static, per-channel,
bias-corrected), in one run:

1. end to end, JPEG files -> prefix maps on the first --limit images, the engines taking turns twice;
2. accuracy: the suffix (2 block groups) and head trained on each engine's maps from the same
   initial weights (AdamW, lr 1e-3, map flips, as the cached path trains), scored on the
   validation maps of the same engine and, for int8, on float maps: the saved model runs the
   float prefix everywhere it is served (PyTorch predict, float ONNX, the HTTP service, a GPU);
3. how alike the maps are (cosine similarity to float, per validation image).

    PYTHONPATH=src python benchmarks/int8_prefix.py [DATA] [--size 192] [--epochs 4]

DATA is a folder with train/ and val/ (or test/) class folders; the ant/bee set by default.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time

import numpy as np
import torch
from _data import HYMENOPTERA
from _lite0 import frozen_lite0
from int8_frozen import float_and_int8

from headstart.data.layout import resolve_data
from headstart.features.prefix import split_model
from headstart.models.freezing import unfreeze_last
from headstart.models.heads import HeadSpec
from headstart.models.transfer import TransferModel


def train_suffix(sp, maps: np.ndarray, y: np.ndarray, epochs: int, seed: int = 0):
    """A copy of the suffix trained on `maps` (N, C*H*W), as the cached-prefix path trains it."""
    suffix = copy.deepcopy(sp.suffix).train()
    params = [p for p in suffix.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
    steps = epochs * (len(maps) // 32)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    x, t = torch.from_numpy(maps).view(len(maps), *sp.shape), torch.from_numpy(y)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - 31, 32):
            idx = order[i : i + 32]
            xb = x[idx]
            flip = torch.rand(len(idx), generator=g) < 0.5
            xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(-1), xb)
            xb = xb.contiguous(memory_format=torch.channels_last)
            loss = torch.nn.functional.cross_entropy(suffix(xb), t[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return suffix.eval()


@torch.inference_mode()
def accuracy(suffix, sp, maps: np.ndarray, y: np.ndarray) -> float:
    x = torch.from_numpy(maps).view(len(maps), *sp.shape)
    pred = torch.cat([suffix(x[i : i + 128].contiguous(memory_format=torch.channels_last)).argmax(1)
                      for i in range(0, len(x), 128)])  # fmt: skip
    return float((pred.numpy() == y).mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", nargs="?", default=HYMENOPTERA)
    ap.add_argument("--size", type=int, default=192)
    ap.add_argument("--unfreeze", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--limit", type=int, default=1500, help="images for the speed part")
    ap.add_argument("--calibration", type=int, default=256, help="training images to calibrate on")
    a = ap.parse_args()
    threads, bb, pp = frozen_lite0()
    pp = dataclasses.replace(pp, input_size=a.size)
    split = resolve_data(a.data)
    torch.manual_seed(0)
    model = TransferModel.build(bb, HeadSpec(), split.classes)
    unfreeze_last(model, a.unfreeze)
    sp = split_model(model, input_size=a.size)
    sp.prefix.eval()
    maps, seconds, (y_tr, y_va), n, n_calib, quantizing = float_and_int8(
        sp.prefix, pp, split, calibration=a.calibration, limit=a.limit, key="int8_prefix"
    )
    print(
        f"{a.data}: {len(split.train)} train / {len(split.val)} val, {a.size} px, prefix up to {sp.at} "
        f"({'x'.join(map(str, sp.shape))} maps), {threads} threads, {n_calib} calibration images "
        f"(loading them, quantizing both: {quantizing:.1f} s), suffix trained {a.epochs} epochs"
    )
    t = time.perf_counter()
    trained = {k: train_suffix(sp, m[0], y_tr, a.epochs) for k, m in maps.items()}
    train_s = (time.perf_counter() - t) / len(maps)
    base = seconds["float"]
    f_va = maps["float"][1]
    acc_f = accuracy(trained["float"], sp, f_va, y_va)
    for k in maps:
        line = f"  {k:22s} end to end {n / seconds[k]:6.1f} img/s ({base / seconds[k]:.2f}x)"
        if k == "float":
            print(line + f", val accuracy {acc_f:.4f}")
            continue
        g_va = maps[k][1]
        cos = (f_va * g_va).sum(1) / (np.linalg.norm(f_va, axis=1) * np.linalg.norm(g_va, axis=1))
        own = accuracy(trained[k], sp, g_va, y_va)
        served_float = accuracy(trained[k], sp, f_va, y_va)
        float_on_int8 = accuracy(trained["float"], sp, g_va, y_va)
        print(line + f", val accuracy {own:.4f} ({100 * (own - acc_f):+.2f} points); trained on these maps, "
              f"served float maps {served_float:.4f} ({100 * (served_float - own):+.2f}); float-trained on "
              f"these maps {float_on_int8:.4f} ({100 * (float_on_int8 - acc_f):+.2f}); cosine to float mean "
              f"{cos.mean():.3f} min {cos.min():.3f}")  # fmt: skip
    print(f"suffix training: {train_s:.1f} s per engine")


if __name__ == "__main__":
    main()
