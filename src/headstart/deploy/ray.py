"""Callable classes for Ray Data `map_batches`: predictions and pooled features from a run folder.

    ds = ray.data.read_binary_files(folder, include_paths=True)
    out = ds.map_batches(RayPredictor, fn_constructor_kwargs={"run_dir": run}, batch_size=64,
                         concurrency=2)

Nothing here imports ray: the classes take and return dicts of numpy arrays, so they are plain,
picklable Python objects (the model is built in each Ray actor by the constructor).
Input columns, first match wins:
  "bytes" (read_binary_files): decoded with headstart.data.load_image, exactly as `headstart predict`
  "image" (read_images): uint8 HWC arrays, any size; the run's resize + centre crop are applied
  "path"  (from_items / a path column): the file is opened with load_image
Decoding "bytes" or "path" matches `headstart predict` exactly (EXIF orientation, JPEG draft
decoding, palette/alpha handling); "image" arrays were decoded by Ray without those steps.
"""

from __future__ import annotations

import io
import os

import numpy as np
import torch
from PIL import Image

from headstart.core.errors import ConfigError
from headstart.data.images import load_image, to_rgb
from headstart.inference.onnx import open_predictor
from headstart.inference.predictor import load
from headstart.models.fastpath import inference_model


def _pil_images(batch: dict, draft: int) -> tuple[list, list[str | None]]:
    """PIL images (None where decoding failed) and per-row errors from a Ray batch."""
    if "bytes" in batch:
        source, decode = batch["bytes"], lambda b: load_image(io.BytesIO(b), draft=draft)
    elif "image" in batch:
        source, decode = batch["image"], lambda a: to_rgb(Image.fromarray(np.asarray(a)))
    elif "path" in batch:
        source, decode = batch["path"], lambda p: load_image(str(p), draft=draft)
    else:
        raise ConfigError(
            f"Ray batch has columns {sorted(batch)}; expected 'bytes' (ray.data.read_binary_files), "
            "'image' (ray.data.read_images) or 'path'."
        )
    pils, errors = [], []
    for item in source:
        try:
            pils.append(decode(item))
            errors.append(None)
        except Exception as e:  # noqa: BLE001 - one bad file gets an error row, not a failed job
            pils.append(None)
            errors.append(f"{type(e).__name__}: {e}")
    return pils, errors


def _paths(batch: dict, n: int) -> np.ndarray:
    return np.asarray(batch["path"], dtype=object) if "path" in batch else np.full(n, "", dtype=object)


class _Rebuilt:
    """Pickles as its constructor arguments: the model (or ONNX session) is rebuilt on unpickling."""

    _kwargs: dict

    def __getstate__(self) -> dict:
        return dict(self._kwargs)

    def __setstate__(self, kwargs: dict) -> None:
        self.__init__(**kwargs)


class RayPredictor(_Rebuilt):
    """Labels and probabilities for a Ray Data batch; engine 'torch' (run folder) or 'onnx'; `tta`
    overrides the trained test-time views (torch engine), as `predict --tta` does."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        engine: str = "torch",
        device: str = "auto",
        threads: int | None = None,
        tta: str | None = None,
    ):
        self._kwargs = dict(run_dir=run_dir, engine=engine, device=device, threads=threads, tta=tta)
        self.predictor = open_predictor(run_dir, engine=engine, device=device, threads=threads, tta=tta)
        self.classes = np.asarray(self.predictor.classes, dtype=object)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """{'bytes'|'image'|'path': ...} -> path, label, probability, probabilities [B, C], error."""
        p = self.predictor
        pils, errors = _pil_images(batch, p.preprocess.resize_size)
        n, c = len(pils), len(p.classes)
        probs = np.full((n, c), np.nan, dtype=np.float32)
        ok = [i for i, im in enumerate(pils) if im is not None]
        if ok:
            x = torch.stack([p.transform(pils[i]) for i in ok])
            probs[ok] = p.predict_tensor(x).numpy()
        top = np.where(np.isnan(probs).any(1), -1, np.nan_to_num(probs, nan=-1).argmax(1))
        return {
            "path": _paths(batch, n),
            "label": np.asarray([self.classes[t] if t >= 0 else "" for t in top], dtype=object),
            "probability": np.asarray([probs[i, t] if t >= 0 else np.nan for i, t in enumerate(top)]),
            "probabilities": probs,
            "error": np.asarray([e or "" for e in errors], dtype=object),
        }


class FeatureExtractor(_Rebuilt):
    """Pooled backbone features [B, D] for a Ray Data batch (PyTorch, the run's backbone)."""

    def __init__(self, run_dir: str | os.PathLike, *, device: str = "auto", threads: int | None = None):
        self._kwargs = dict(run_dir=run_dir, device=device, threads=threads)
        self.predictor = load(run_dir, device=device)
        if threads:
            torch.set_num_threads(threads)
        self.dim = int(self.predictor.model.backbone.feature_dim)

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """{'bytes'|'image'|'path': ...} -> path, features [B, D] (NaN rows where decoding failed), error."""
        p = self.predictor
        pils, errors = _pil_images(batch, p.preprocess.resize_size)
        feats = np.full((len(pils), self.dim), np.nan, dtype=np.float32)
        ok = [i for i, im in enumerate(pils) if im is not None]
        if ok:
            x = torch.stack([p.transform(pils[i]) for i in ok]).to(p.device)
            backbone = inference_model(p.model.backbone, p.device)  # the BN-folded, channels-last copy
            x = x.contiguous(memory_format=torch.channels_last)
            feats[ok] = backbone(x).float().cpu().numpy()
        return {"path": _paths(batch, len(pils)), "features": feats,
                "error": np.asarray([e or "" for e in errors], dtype=object)}  # fmt: skip
