"""Benchmark (d): one fine-tune epoch (last 2 block groups + head) on ant/bee: headstart
(`strategy="finetune"`, channels-last, frozen prefix without graph, optimizer on trainable
tensors only) vs the tutorial loop (requires_grad=False prefix, every tensor in the optimizer,
NCHW, ImageFolder + default DataLoader). Same data, same augmentation, one process.

    PYTHONPATH=src python benchmarks/finetune_epoch.py [--data DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _data import HYMENOPTERA
from torch import nn
from torchvision import datasets

import headstart
from headstart.data.transforms import eval_transform, train_transform
from headstart.models.backbones import create_backbone
from headstart.training.setup import preprocess_of


def tutorial_epoch(data: Path) -> float:
    """The classic loop: freeze all, unfreeze the last two groups, optimizer over everything;
    an epoch is a train phase and a val phase, as in the PyTorch tutorial's train_model."""
    torch.manual_seed(0)
    bb = create_backbone("efficientnet_lite0")
    model = nn.Sequential(bb, nn.Linear(bb.feature_dim, 2))
    for p in bb.parameters():
        p.requires_grad = False
    for g in bb.block_groups()[-2:]:
        for name in g:
            for p in bb.get_submodule(name).parameters():
                p.requires_grad = True
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ds = datasets.ImageFolder(data / "train", train_transform(preprocess_of(bb)),
                              is_valid_file=lambda p: not p.endswith(".gif"))  # fmt: skip
    model.train()
    t = time.perf_counter()
    for x, y in torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    val = datasets.ImageFolder(data / "val", eval_transform(preprocess_of(bb)))
    with torch.no_grad():
        for x, _ in torch.utils.data.DataLoader(val, batch_size=32):
            model(x)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=HYMENOPTERA)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        r = headstart.train(a.data, output=f"{tmp}/ft", strategy="finetune", unfreeze=2, epochs=1)
        ours = r.metrics[0]["seconds"]
        p = headstart.train(a.data, output=f"{tmp}/cp", strategy="finetune", unfreeze=2, epochs=2,
                            cache_prefix=True, cache_dir=f"{tmp}/cache")  # fmt: skip
        prefix_once, prefix_epoch = p["extract_seconds"], p.metrics[-1]["seconds"]
    base = tutorial_epoch(Path(a.data))
    print(f"tutorial loop epoch (train + val):            {base:.1f}s")
    print(f"headstart finetune epoch (train + val):       {ours:.1f}s   RATIO {base / ours:.2f}x")
    r2 = base / prefix_epoch
    print(f"headstart --cache-prefix epoch (train + val): {prefix_epoch:.1f}s   RATIO {r2:.2f}x"
          f"  (after caching the frozen prefix once: {prefix_once:.1f}s)")  # fmt: skip


if __name__ == "__main__":
    main()
