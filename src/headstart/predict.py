"""Loading a run folder and predicting: `headstart.load(run_dir).predict(images)`."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from headstart.backbones import BackboneConfig, backbone_from_config
from headstart.data import (
    IMG_EXTENSIONS,
    ImageDataset,
    Preprocess,
    _is_ignored,
    eval_transform,
    make_loader,
)
from headstart.device import autocast_for, configure_threads, pick_device, to_device
from headstart.errors import DataError
from headstart.fastpath import inference_model
from headstart.heads import HeadSpec, logits_to_probs
from headstart.model import TransferModel
from headstart.progress import bar as progress_bar
from headstart.runs import MODEL_JSON, WEIGHTS, load_weights, read_json


@dataclass
class Prediction:
    """Top-k labels and probabilities for one image, or the error that stopped it."""

    path: str
    labels: list[str]
    probabilities: list[float]
    error: str | None = None

    @property
    def label(self) -> str | None:
        """Top-1 label."""
        return self.labels[0] if self.labels else None

    @property
    def probability(self) -> float | None:
        """Top-1 probability."""
        return self.probabilities[0] if self.probabilities else None


class Predictor:
    """A trained model plus its preprocessing; built from a run folder by `load`."""

    def __init__(
        self, model: TransferModel, preprocess: Preprocess, record: dict, device, *, fast: bool = True
    ):
        self.model = model.eval()
        self.fast = fast  # BN-folded channels-last copy of the backbone (headstart.fastpath)
        self.preprocess = preprocess
        self.record = record
        self.device = device
        self.classes: list[str] = list(record["classes"])
        self.temperature: float = float(record.get("temperature", 1.0))
        self.transform = eval_transform(preprocess)

    @torch.inference_mode()
    def predict_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities [B, C] for a batch of already preprocessed images."""
        x = to_device(x, self.device)
        if self.fast:
            backbone = inference_model(self.model.backbone, self.device)
            x = x.contiguous(memory_format=torch.channels_last)
        else:
            backbone = self.model.backbone
        with autocast_for(self.device):
            logits = self.model.head(backbone(x))
        return logits_to_probs(logits.float() / self.temperature, self.model.head_spec.kind).cpu()

    def predict_proba(self, images: Iterable, *, batch_size: int = 32) -> np.ndarray:
        """Probabilities [N, C] for image paths or PIL images (errors raise)."""
        out = []
        for chunk in _chunks(list(images), batch_size):
            xs = [self.transform(_as_pil(im, self.preprocess.resize_size)) for im in chunk]
            out.append(self.predict_tensor(torch.stack(xs)).numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def predict(
        self,
        images: Iterable,
        *,
        top_k: int = 1,
        batch_size: int = 32,
        num_workers: int | None = None,
        progress: bool = False,
    ) -> list[Prediction]:
        """Top-k predictions for paths, folders or PIL images; unreadable files get an error."""
        return list(
            self.iter_predict(
                images, top_k=top_k, batch_size=batch_size, num_workers=num_workers,
                progress=progress,
            )
        )  # fmt: skip

    def iter_predict(
        self,
        images: Iterable,
        *,
        top_k: int = 1,
        batch_size: int = 32,
        num_workers: int | None = None,
        progress: bool = False,
    ) -> Iterator[Prediction]:
        """Stream predictions in input order; paths are decoded in background workers."""
        k = max(1, min(top_k, len(self.classes)))
        images = list(images)
        pils = [(i, im) for i, im in enumerate(images) if isinstance(im, Image.Image)]
        if pils:
            probs = self.predict_proba([im for _, im in pils], batch_size=batch_size)
            for (i, _), p in zip(pils, probs, strict=True):
                yield self._top(f"<image {i}>", p, k)
            images = [im for im in images if not isinstance(im, Image.Image)]
        paths = expand_paths(images)
        if not paths:
            return
        ds = ImageDataset([(p, 0) for p in paths], self.transform, draft=self.preprocess.resize_size)
        loader = make_loader(
            ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
            pin_memory=self.device.type == "cuda", ramp=True,  # first rows come out sooner
        )  # fmt: skip
        bar = progress_bar(total=len(paths), unit="img", desc="predict", enabled=progress)
        for batch in loader:
            results: dict[int, Prediction] = {
                i: Prediction(paths[i], [], [], error=why) for i, why in batch.failed
            }
            if batch.x is not None:
                probs = self.predict_tensor(batch.x).numpy()
                for i, p in zip(batch.index.tolist(), probs, strict=True):
                    results[i] = self._top(paths[i], p, k)
            for i in sorted(results):
                yield results[i]
            bar.update(len(results))
        bar.close()

    def _top(self, path: str, probs: np.ndarray, k: int) -> Prediction:
        order = np.argsort(-probs, kind="stable")[:k]
        return Prediction(path, [self.classes[j] for j in order], [float(probs[j]) for j in order])

    def __repr__(self) -> str:
        return f"Predictor({self.record['backbone']['name']}, classes={self.classes}, device={self.device})"


def load(run_dir: str | os.PathLike, *, device: str = "auto", fast: bool = True) -> Predictor:
    """Load a trained model from a run folder (model.json + model.safetensors).

    fast=True runs a BatchNorm-folded, channels-last copy of the backbone (checked against it);
    fast=False runs the stored model exactly as trained (export parity uses that).
    """
    run_dir = Path(run_dir)
    record = read_json(run_dir / MODEL_JSON)
    cfg = BackboneConfig.from_dict(record["backbone"])
    backbone = backbone_from_config(cfg)
    model = TransferModel.build(backbone, HeadSpec.from_dict(record["head"]), record["classes"])
    state = load_weights(run_dir / WEIGHTS)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DataError(
            f"{str(run_dir / WEIGHTS)!r} does not match {str(run_dir / MODEL_JSON)!r}: "
            f"{len(missing)} missing and {len(unexpected)} unexpected tensors "
            f"(e.g. {', '.join((missing + unexpected)[:3])}). The run folder is inconsistent."
        )
    configure_threads()
    dev = pick_device(device)
    model.to(dev).eval()
    return Predictor(model, Preprocess.from_dict(record["preprocessing"]), record, dev, fast=fast)


def expand_paths(inputs: Iterable) -> list[str]:
    """Files as given, folders expanded recursively to their image files (sorted)."""
    out = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not _is_ignored(d))
                out += [
                    os.path.join(dirpath, f)
                    for f in sorted(filenames)
                    if f.lower().endswith(IMG_EXTENSIONS) and not _is_ignored(f)
                ]
        elif p.exists():
            out.append(str(p))
        else:
            raise DataError(f"{str(p)!r} does not exist: pass image files or folders of images.")
    return out


def csv_header(top_k: int) -> list[str]:
    """Columns of the prediction CSV: path,label,probability,label_2,probability_2,…,error."""
    extra = [c for j in range(2, top_k + 1) for c in (f"label_{j}", f"probability_{j}")]
    return ["path", "label", "probability", *extra, "error"]


def write_csv(
    predictions: Iterable[Prediction], path: str | os.PathLike, top_k: int, *, append: bool = False
) -> int:
    """Rows `path,label,probability` (top-1), then label_2,probability_2… and error; returns rows.

    `append` adds rows to an existing file without writing the header again (for --resume).
    """
    n = 0
    with open(path, "a" if append else "w", newline="") as f:
        w = csv.writer(f)
        if not append:
            w.writerow(csv_header(top_k))
        for p in predictions:
            cells = []
            for j in range(top_k):
                has = j < len(p.labels)
                cells += [p.labels[j] if has else "", f"{p.probabilities[j]:.6f}" if has else ""]
            w.writerow([p.path, *cells, p.error or ""])
            n += 1
            f.flush()
    return n


def _as_pil(im, draft: int):
    from headstart.data import load_image, to_rgb

    if isinstance(im, Image.Image):
        return to_rgb(im)
    return load_image(im, draft=draft)


def _chunks(seq: list, n: int):
    for i in range(0, len(seq), n):
        yield seq[i : i + n]
