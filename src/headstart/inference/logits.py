"""One pass of logits over labelled images: what evaluate, calibrate and report all consume."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from headstart.core.errors import DataError
from headstart.core.files import SPLIT, read_json
from headstart.core.logs import progress
from headstart.core.metrics import probabilities_np
from headstart.data.layout import dataset_items
from headstart.data.loading import ImageDataset, make_loader
from headstart.inference.predictor import Predictor


@dataclass
class Logits:
    """Raw head outputs (temperature 1) of labelled images, with their paths and failures."""

    paths: list[str]
    y: np.ndarray
    logits: np.ndarray  # float64 [N, C] ([N, 1] for a binary head)
    head_kind: str
    classes: list[str]
    skipped: list[dict] = field(default_factory=list)
    data: str = "validation split of the run"
    features: np.ndarray | None = None  # pooled backbone features [N, D], when asked for

    def probs(self, temperature: float = 1.0) -> np.ndarray:
        """Class probabilities [N, C] at `temperature`."""
        return probabilities_np(self.logits, self.head_kind, temperature)


def evaluation_items(
    run_dir: str | os.PathLike, classes: list[str], data: str | None
) -> list[tuple[str, int]]:
    """The images to evaluate: the run's own validation split, or a class tree / train-val folder."""
    if data is None:
        split_file = Path(run_dir) / SPLIT
        if not split_file.exists():
            raise DataError(f"{str(split_file)!r} is missing; pass --data DIR to evaluate on.")
        return split_items(run_dir, "val")
    return dataset_items(data, classes)


def split_items(
    run_dir: str | os.PathLike, part: str, limit: int | None = None, *, seed: int = 0
) -> list[tuple[str, int]]:
    """The run's `part` ("train" or "val") images from split.json; over `limit`, a stratified sample."""
    split = Path(run_dir) / SPLIT
    if not split.exists():
        raise DataError(f"{str(split)!r} is missing: this needs the run's {part} images.")
    items = [(p, int(y)) for p, y in read_json(split)[part]]
    if limit is None or len(items) <= limit:
        return items
    order = np.random.default_rng(seed).permutation(len(items))
    per_class = -(-limit // len({y for _, y in items}))
    taken: dict[int, int] = {}
    out = []
    for i in order:
        y = items[i][1]
        if taken.get(y, 0) < per_class:
            taken[y] = taken.get(y, 0) + 1
            out.append(items[i])
    return out[:limit]


def collect_logits(
    predictor: Predictor,
    items: list[tuple[str, int]],
    *,
    data: str | None = None,
    batch_size: int = 64,
    num_workers: int | None = None,
    features: bool = False,
    desc: str = "logits",
) -> Logits:
    """Logits of `items` ((path, label) pairs), one forward pass per image; unreadable files listed.

    features=True also keeps the pooled backbone features (PyTorch engine only).
    """
    ds = ImageDataset(items, predictor.transform, draft=predictor.preprocess.resize_size)
    loader = make_loader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers, ramp=True)
    zs, fs, idx, skipped = [], [], [], []
    with progress(total=len(items), desc=desc, unit="img") as bar:
        for batch in loader:
            skipped += [{"path": items[i][0], "reason": why} for i, why in batch.failed]
            if batch.x is not None:
                if features:
                    f, z = predictor.features_and_logits(batch.x)
                    fs.append(f.flatten(1))
                else:
                    z = predictor.logits_tensor(batch.x)
                zs.append(z.reshape(len(batch.index), -1))
                idx += batch.index.tolist()
            bar.update(len(batch.index) + len(batch.failed))
    width = 1 if predictor.head_kind == "binary" else len(predictor.classes)
    logits = torch.cat(zs).double().numpy() if zs else np.zeros((0, width))
    return Logits(
        features=torch.cat(fs).numpy() if fs else None,
        paths=[items[i][0] for i in idx],
        y=np.array([items[i][1] for i in idx], dtype=np.int64),
        logits=logits,
        head_kind=predictor.head_kind,
        classes=list(predictor.classes),
        skipped=skipped,
        data=data or "validation split of the run",
    )


def run_logits(
    run_dir: str | os.PathLike,
    *,
    data: str | None = None,
    device: str = "auto",
    batch_size: int = 64,
    num_workers: int | None = None,
    features: bool = False,
) -> tuple[Predictor, Logits]:
    """Load a run and collect the logits (and features) of its validation split (or of `data`)."""
    from headstart.inference.predictor import load

    predictor = load(run_dir, device=device)
    items = evaluation_items(run_dir, predictor.classes, data)
    return predictor, collect_logits(
        predictor, items, data=data, batch_size=batch_size, num_workers=num_workers, features=features
    )
