"""Loading a run folder and predicting: `headstart.load(run_dir).predict(images)`."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from headstart.core.device import autocast_for, configure_threads, pick_device, to_device
from headstart.core.logs import progress as progress_bar
from headstart.core.metrics import probabilities
from headstart.data.images import load_image, to_rgb
from headstart.data.layout import expand_inputs
from headstart.data.loading import ImageDataset, make_loader
from headstart.data.transforms import Preprocess, eval_transform
from headstart.models.fastpath import inference_model
from headstart.models.store import load_model
from headstart.models.transfer import TransferModel


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
        self.head_kind: str = record["head"]["kind"]
        self.transform = eval_transform(preprocess)

    @torch.inference_mode()
    def logits_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Raw head outputs (temperature 1) for a batch of already preprocessed images, on the CPU."""
        x = to_device(x, self.device)
        if self.fast:
            backbone = inference_model(self.model.backbone, self.device)
            x = x.contiguous(memory_format=torch.channels_last)
        else:
            backbone = self.model.backbone
        with autocast_for(self.device):
            logits = self.model.head(backbone(x))
        return logits.float().cpu()

    def predict_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities [B, C] for a batch of already preprocessed images (temperature applied)."""
        return probabilities(self.logits_tensor(x), self.head_kind, self.temperature)

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
                images,
                top_k=top_k,
                batch_size=batch_size,
                num_workers=num_workers,
                progress=progress,
            )
        )

    def iter_predict(
        self,
        images: Iterable,
        *,
        top_k: int = 1,
        batch_size: int = 32,
        num_workers: int | None = None,
        progress: bool = False,
    ) -> Iterator[Prediction]:
        """Stream predictions in input order (PIL images first); folders expand to their images."""
        k = max(1, min(top_k, len(self.classes)))
        images = list(images)
        pils = [(i, im) for i, im in enumerate(images) if isinstance(im, Image.Image)]
        if pils:
            probs = self.predict_proba([im for _, im in pils], batch_size=batch_size)
            for (i, _), p in zip(pils, probs, strict=True):
                yield self._top(f"<image {i}>", p, k)
        paths, _ = expand_inputs([im for im in images if not isinstance(im, Image.Image)])
        yield from self.predict_paths(
            paths, top_k=k, batch_size=batch_size, num_workers=num_workers, progress=progress
        )

    def predict_paths(
        self,
        paths: list[str],
        *,
        top_k: int = 1,
        batch_size: int = 32,
        num_workers: int | None = None,
        progress: bool = False,
    ) -> Iterator[Prediction]:
        """Stream predictions for image files decoded in background workers; unreadable ones get an error."""
        if not paths:
            return
        k = max(1, min(top_k, len(self.classes)))
        ds = ImageDataset([(p, 0) for p in paths], self.transform, draft=self.preprocess.resize_size)
        loader = make_loader(
            ds,
            batch_size=batch_size,
            shuffle=False,
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
            ramp=True,  # first rows come out sooner
        )
        with progress_bar(total=len(paths), unit="img", desc="predict", enabled=progress) as bar:
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
    model, preprocess, record = load_model(run_dir)
    configure_threads()
    dev = pick_device(device)
    return Predictor(model.to(dev).eval(), preprocess, record, dev, fast=fast)


def _as_pil(im, draft: int) -> Image.Image:
    if isinstance(im, Image.Image):
        return to_rgb(im)
    return load_image(im, draft=draft)


def _chunks(seq: list, n: int):
    for i in range(0, len(seq), n):
        yield seq[i : i + n]
