"""headstart `--strategy auto --budget B` against fastai's `fine_tune` on the same split, the same
embedded EfficientNet-Lite ImageNet weights and the same wall time, in one run.

    pip install fastai                      # not a headstart dependency: this benchmark only
    python benchmarks/vs_fastai.py DATA --budget 5m [--output runs/vs-fastai]

DATA has train/ and val/ (or test/) class folders. headstart runs first, with a cold feature cache;
its wall time T sets fastai's: `fine_tune(n)` (one frozen epoch, then n unfrozen ones, fastai's
default recipe with its aug_transforms, on the embedded backbone and at the input size headstart
chose) with the largest n whose predicted time, from a timed first epoch, fits in T; where that
run takes under 0.9 T, fine_tune(n + 1) runs too, so fastai is also shown with more time than
headstart had. Both are scored on the same validation images.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_headstart(data: Path, budget: str, out: Path, cache: str) -> tuple[float, float, int, str]:
    """headstart's wall time, validation accuracy, and the input size and backbone auto chose."""
    t = time.perf_counter()
    cmd = [
        sys.executable,
        "-m",
        "headstart",
        "train",
        str(data),
        "--strategy",
        "auto",
        "--budget",
        budget,
        "-o",
        str(out),
        "--cache-dir",
        cache,
        "--overwrite",
        "-q",
    ]
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t
    size = json.loads((out / "model.json").read_text())["preprocessing"]["input_size"]
    results = json.loads((out / "results.json").read_text())
    return wall, results["val_accuracy"], size, results["backbone"]


def fastai_learner(data: Path, size: int = 224, backbone: str = "efficientnet_lite0"):
    """vision_learner on timm's tf_efficientnet_lite{0,1,2} with the embedded weights, normalised as
    they expect (mean = std = 0.5); fastai's default item and batch transforms."""
    import torch
    from fastai.vision.all import (
        ImageDataLoaders,
        Normalize,
        Resize,
        accuracy,
        aug_transforms,
        vision_learner,
    )

    from headstart.models.backbones import create_backbone

    val = next(n for n in ("val", "valid", "validation", "test") if (data / n).is_dir())
    batch_tfms = [*aug_transforms(size=size), Normalize.from_stats([0.5] * 3, [0.5] * 3)]
    dls = ImageDataLoaders.from_folder(
        data,
        train="train",
        valid=val,
        item_tfms=Resize(int(size / 0.875)),
        batch_tfms=batch_tfms,
        bs=32,
        num_workers=1,
    )
    learn = vision_learner(dls, f"tf_{backbone}", pretrained=False, normalize=False, metrics=accuracy)
    body = learn.model[0].model if hasattr(learn.model[0], "model") else learn.model[0]
    weights = create_backbone(backbone).body.state_dict()
    missing, _ = body.load_state_dict(weights, strict=False)
    assert not [k for k in missing if not k.startswith("classifier")], missing[:5]
    torch.set_num_threads(torch.get_num_threads())
    return learn


def run_fastai(data: Path, seconds: float, size: int, backbone: str) -> tuple[int, float]:
    """The largest n for which fine_tune(n) is predicted to fit in `seconds`, and the time of one
    frozen epoch (fine_tune's first)."""
    t = time.perf_counter()
    probe = fastai_learner(data, size, backbone)
    t_epoch = time.perf_counter()
    probe.fit_one_cycle(1)  # one epoch with the backbone frozen: what fine_tune's first epoch costs
    epoch = time.perf_counter() - t_epoch
    setup = t_epoch - t
    unfrozen_epoch = 1.6 * epoch  # backward through the whole backbone (measured ratio on this box)
    return max(1, int((seconds - setup - epoch) / unfrozen_epoch)), epoch


def fine_tune(data: Path, n: int, size: int, backbone: str) -> tuple[float, float]:
    """fastai's fine_tune(n) from a fresh learner: wall time and validation accuracy."""
    t = time.perf_counter()
    learn = fastai_learner(data, size, backbone)
    learn.fine_tune(n)
    wall = time.perf_counter() - t
    return wall, float(learn.validate()[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data", type=Path)
    ap.add_argument("--budget", default="5m")
    ap.add_argument("--output", type=Path, default=Path("runs/vs-fastai"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        t_hs, acc_hs, size, backbone = run_headstart(a.data, a.budget, a.output, cache)
    n, _ = run_fastai(a.data, t_hs, size, backbone)
    runs = [(n, *fine_tune(a.data, n, size, backbone))]
    if runs[0][1] < 0.9 * t_hs:  # fine_tune(n) took less time than headstart: also give it one more epoch
        runs.append((n + 1, *fine_tune(a.data, n + 1, size, backbone)))
    print(f"data {a.data}, budget {a.budget}, {backbone} at {size} px (what headstart chose) for both")
    print(f"headstart --strategy auto:   val acc {acc_hs:.4f} in {t_hs:.0f}s (cold cache)")
    for k, t_fa, acc_fa in runs:
        print(f"fastai fine_tune({k}):        val acc {acc_fa:.4f} in {t_fa:.0f}s")
        gap, ratio = 100 * (acc_hs - acc_fa), t_fa / t_hs
        print(f"  DIFFERENCE {gap:+.1f} points, fastai at {ratio:.2f}x headstart's wall time")


if __name__ == "__main__":
    main()
