"""Loading a run folder and predicting: `headstart.load(run_dir).predict(images)`."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from headstart.core.device import configure_threads, pick_device, to_device
from headstart.core.errors import ConfigError
from headstart.core.logs import progress as progress_bar
from headstart.core.metrics import probabilities
from headstart.data.images import load_image, to_rgb
from headstart.data.layout import expand_inputs
from headstart.data.loading import ImageDataset, make_loader
from headstart.data.transforms import Preprocess, eval_transform
from headstart.inference.uncertainty import UNKNOWN, ConformalSets, FeatureDistance, Rejection
from headstart.models.fastpath import inference_model
from headstart.models.store import load_model, load_weights
from headstart.models.transfer import TransferModel
from headstart.models.tta import TTA_CHOICES, features_and_logits


@dataclass
class Prediction:
    """Top-k labels and probabilities for one image, or the error that stopped it.

    `set` is the conformal prediction set and `ood_score` the distance to the training classes,
    when the run was calibrated for them; `unknown` is True when rejection was asked for and the
    image looks like none of the classes (then `label` is "unknown"; `labels` keep the ranking).
    """

    path: str
    labels: list[str]
    probabilities: list[float]
    error: str | None = None
    set: list[str] | None = None
    ood_score: float | None = None
    unknown: bool = False

    @property
    def label(self) -> str | None:
        """Top-1 label ("unknown" when rejected)."""
        if self.unknown:
            return UNKNOWN
        return self.labels[0] if self.labels else None

    @property
    def probability(self) -> float | None:
        """Top-1 probability."""
        return self.probabilities[0] if self.probabilities else None


class Predictor:
    """A trained model plus its preprocessing; built from a run folder by `load`."""

    # why the run's prediction sets and rejection are off (test-time views other than trained)
    calibration_off: str | None = None

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
        self.sets = ConformalSets.from_dict(record["conformal"]) if record.get("conformal") else None
        self.rejection = Rejection.from_dict(record["ood"]) if record.get("ood") else None
        self.distance: FeatureDistance | None = None  # set by `load` from ood.safetensors

    @property
    def tta(self) -> str:
        """The test-time views predictions use."""
        return self.model.tta

    @torch.inference_mode()
    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled backbone features and raw head outputs (temperature 1) of preprocessed images (CPU)."""
        x = to_device(x, self.device)
        if self.fast:
            backbone = inference_model(self.model.backbone, self.device)
            x = x.contiguous(memory_format=torch.channels_last)
        else:
            backbone = self.model.backbone
        # Full precision on every device: on an H200, bf16 autocast changed 2 of 90 ant/bee labels
        # against the exported ONNX model, and calibrated sets and thresholds assume fp32 logits.
        f, logits = features_and_logits(backbone, self.model.head, x, self.model.tta)
        return f.float().cpu(), logits.float().cpu()

    def logits_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Raw head outputs (temperature 1) for a batch of already preprocessed images, on the CPU."""
        return self.features_and_logits(x)[1]

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw logits and, when the run has a rejection threshold, each image's OOD score."""
        if self.distance is None:
            return self.logits_tensor(x), None
        f, logits = self.features_and_logits(x)
        with torch.inference_mode():
            return logits, self.distance(f)

    def predict_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities [B, C] for a batch of already preprocessed images (temperature applied)."""
        return probabilities(self.logits_tensor(x), self.head_kind, self.temperature)

    def require(self, *, sets: bool = False, reject: bool = False) -> None:
        """Refuse, with the command that fixes it, when sets or rejection were asked of a run without them."""
        missing = [w for w, asked, have in (("prediction sets", sets, self.sets), ("rejection", reject,
                   self.rejection)) if asked and have is None]  # fmt: skip
        if missing and self.calibration_off:
            raise ConfigError(f"No {' or '.join(missing)} here: {self.calibration_off}.")
        if missing:
            raise ConfigError(
                f"This model has no {' or '.join(missing)} fitted. Run `headstart calibrate RUN` first "
                "(it fits them on the validation split; --coverage and --accept set the targets), "
                "then export again if you use the ONNX model."
            )

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
        reject: bool = False,
    ) -> list[Prediction]:
        """Top-k predictions for paths, folders or PIL images; unreadable files get an error.

        reject=True labels images that look like none of the classes "unknown" (needs `calibrate`).
        """
        return list(
            self.iter_predict(
                images,
                top_k=top_k,
                batch_size=batch_size,
                num_workers=num_workers,
                progress=progress,
                reject=reject,
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
        reject: bool = False,
    ) -> Iterator[Prediction]:
        """Stream predictions in input order (PIL images first); folders expand to their images."""
        self.require(reject=reject)
        k = max(1, min(top_k, len(self.classes)))
        images = list(images)
        pils = [(i, im) for i, im in enumerate(images) if isinstance(im, Image.Image)]
        for chunk in _chunks(pils, batch_size):
            x = torch.stack([self.transform(to_rgb(im)) for _, im in chunk])
            for (i, _), pred in zip(chunk, self.rank(*self.outputs(x), k, reject=reject), strict=True):
                pred.path = f"<image {i}>"
                yield pred
        paths, _ = expand_inputs([im for im in images if not isinstance(im, Image.Image)])
        yield from self.predict_paths(
            paths, top_k=k, batch_size=batch_size, num_workers=num_workers, progress=progress, reject=reject
        )

    def predict_paths(
        self,
        paths: list[str],
        *,
        top_k: int = 1,
        batch_size: int = 32,
        num_workers: int | None = None,
        progress: bool = False,
        reject: bool = False,
    ) -> Iterator[Prediction]:
        """Stream predictions for image files decoded in background workers; unreadable ones get an error."""
        self.require(reject=reject)
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
                    ranked = self.rank(*self.outputs(batch.x), k, reject=reject)
                    for i, pred in zip(batch.index.tolist(), ranked, strict=True):
                        pred.path = paths[i]
                        results[i] = pred
                for i in sorted(results):
                    yield results[i]
                bar.update(len(results))

    def rank(
        self, logits: torch.Tensor, ood: torch.Tensor | None, k: int, *, reject: bool = False
    ) -> list[Prediction]:
        """Predictions (path left empty) from a batch's logits and OOD scores: top-k, set, unknown."""
        probs = probabilities(logits, self.head_kind, self.temperature).numpy()
        in_set = self.sets.mask(probs) if self.sets else None
        out = []
        for n, p in enumerate(probs):
            order = np.argsort(-p, kind="stable")
            pred = Prediction("", [self.classes[j] for j in order[:k]], [float(p[j]) for j in order[:k]])
            if in_set is not None:
                pred.set = [self.classes[j] for j in order if in_set[n, j]]
            if ood is not None:
                pred.ood_score = float(ood[n])
                pred.unknown = reject and bool(self.rejection.unknown(pred.ood_score))
            out.append(pred)
        return out

    def __repr__(self) -> str:
        return f"Predictor({self.record['backbone']['name']}, classes={self.classes}, device={self.device})"


def load(
    run_dir: str | os.PathLike, *, device: str = "auto", fast: bool = True, tta: str | None = None
) -> Predictor:
    """Load a trained model from a run folder (model.json + model.safetensors).

    fast=True runs a BatchNorm-folded, channels-last copy of the backbone (checked against it);
    fast=False runs the stored model exactly as trained (export parity uses that). tta overrides
    the test-time views the run was trained with ("none" halves the work of an "hflip" model);
    prediction sets and rejection then stay off, as they were fitted on the trained views' logits.
    """
    model, preprocess, record = load_model(run_dir)
    configure_threads()
    dev = pick_device(device)
    predictor = Predictor(model.to(dev).eval(), preprocess, record, dev, fast=fast)
    if tta is not None and tta != model.tta:
        if tta not in TTA_CHOICES:
            raise ConfigError(f"tta={tta!r} is not one of {', '.join(TTA_CHOICES)}.")
        if predictor.sets is not None or predictor.rejection is not None:
            predictor.calibration_off = (
                f"this run's prediction sets and rejection were fitted on its logits with test-time views "
                f"{model.tta!r}, and tta={tta!r} changes those logits, so their coverage and acceptance "
                "would not hold. Predict with the trained views (drop --tta) to use them"
            )
        predictor.sets = predictor.rejection = None
        model.tta = tta
    if predictor.rejection is not None:
        state = load_weights(os.path.join(run_dir, predictor.rejection.file))
        predictor.distance = FeatureDistance(state["centers"], state["whiten"]).eval()
    return predictor


def _as_pil(im, draft: int) -> Image.Image:
    if isinstance(im, Image.Image):
        return to_rgb(im)
    return load_image(im, draft=draft)


def _chunks(seq: list, n: int):
    for i in range(0, len(seq), n):
        yield seq[i : i + n]
