"""Export a run for deployment (ONNX, TorchScript, safetensors) and prove it with a parity check.

The ONNX and TorchScript models take RGB floats in [0, 1], NCHW at the run's input size, with any
batch size: normalisation, the head and the run's temperature are inside the graph. They return
`probabilities` [B, C] (temperature applied, what `headstart predict` reports) and `logits`
(the raw head output, before temperature: [B, C], or [B, 1] for a binary head).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torchvision import transforms as T

from headstart.core.errors import ConfigError, HeadstartError
from headstart.core.files import (
    MODEL_JSON,
    SPLIT,
    WEIGHTS,
    read_json,
    require_finished,
    write_json,
)
from headstart.core.metrics import probabilities
from headstart.data.images import load_image
from headstart.data.transforms import Preprocess, eval_transform
from headstart.inference.onnx import INPUT_NAME, OOD_OUTPUT, OUTPUT_NAMES, onnx_session, set_onnx_metadata
from headstart.inference.predictor import load
from headstart.inference.uncertainty import FeatureDistance
from headstart.models.store import save_weights
from headstart.models.tta import features_and_logits

if TYPE_CHECKING:
    from headstart.deploy.quantize import QuantizeResult

FORMATS = ("onnx", "torchscript", "safetensors")
DEFAULT_NAMES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt", "safetensors": "export"}
DEFAULT_OPSET = 18
TOLERANCE = 1e-4  # fp32: max |p_exported - p_original| allowed
EXPORT_FORMAT = 1


class ExportParityError(HeadstartError):
    """The exported model does not reproduce the original's predictions."""

    exit_code = 3


@dataclass
class Parity:
    """How closely the exported model reproduces `headstart.load(run)` on real images."""

    images: int
    source: str
    max_abs_diff: float
    top1_agreement: float
    tolerance: float
    skipped: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Every top-1 agrees and no probability moved more than the tolerance."""
        return self.top1_agreement == 1.0 and self.max_abs_diff <= self.tolerance

    def describe(self) -> str:
        """One line for the CLI."""
        return (
            f"parity on {self.images} images ({self.source}): max |dp| = {self.max_abs_diff:.2e} "
            f"(tolerance {self.tolerance:.0e}), top-1 agreement {self.top1_agreement:.2%}"
        )


@dataclass
class ExportResult:
    """Where the export went, its metadata and its parity check."""

    path: Path
    format: str
    metadata_path: Path
    parity: Parity | None
    exporter: str
    seconds: float
    int8: QuantizeResult | None = None


class ExportModule(nn.Module):
    """[0, 1] RGB NCHW -> (probabilities with temperature, raw logits[, OOD score]); normalisation inside."""

    def __init__(
        self,
        model: nn.Module,
        preprocess: Preprocess,
        temperature: float,
        head_kind: str,
        distance: FeatureDistance | None = None,
    ):
        super().__init__()
        self.model = model
        self.distance = distance
        self.temperature = float(temperature)
        self.head_kind = head_kind
        self.register_buffer("mean", torch.tensor(preprocess.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(preprocess.std, dtype=torch.float32).view(1, 3, 1, 1))

    @property
    def output_names(self) -> list[str]:
        """Names of the graph outputs, in order."""
        return [*OUTPUT_NAMES, *([OOD_OUTPUT] if self.distance is not None else [])]

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Probabilities [B, C], logits and, for a run calibrated for rejection, OOD scores [B]."""
        x = (image - self.mean) / self.std
        features, logits = features_and_logits(self.model.backbone, self.model.head, x, self.model.tta)
        probs = probabilities(logits, self.head_kind, self.temperature)
        if self.distance is None:
            return probs, logits
        return probs, logits, self.distance(features)


def export_metadata(record: dict, *, fmt: str, exporter: str) -> dict:
    """What a consumer of the export needs: classes, preprocessing, input and output contract."""
    from headstart import __version__

    pp = Preprocess.from_dict(record["preprocessing"])
    return {
        "headstart_export_format": EXPORT_FORMAT,
        "headstart_version": __version__,
        "format": fmt,
        "exporter": exporter,
        "classes": list(record["classes"]),
        "temperature": float(record.get("temperature", 1.0)),
        # inside the graph: the logits are the mean over the image and its mirror (models/tta.py)
        "tta": record.get("tta", "none"),
        **{k: record[k] for k in ("conformal", "ood") if record.get(k)},
        "head": record["head"],
        "backbone": record["backbone"]["name"],
        "preprocessing": {
            **pp.to_dict(),
            "steps": [
                "decode to RGB (EXIF orientation applied)",
                f"resize shorter side to {pp.resize_size} ({pp.interpolation})",
                f"centre crop {pp.input_size}x{pp.input_size}",
                "scale to float32 in [0, 1]; mean/std normalisation is inside the model",
            ],
        },
        "input": {
            "name": INPUT_NAME,
            "layout": "NCHW",
            "color": "RGB",
            "dtype": "float32",
            "range": [0.0, 1.0],
            "shape": ["batch", 3, pp.input_size, pp.input_size],
        },
        "outputs": {
            "probabilities": "float32 [batch, classes]: class probabilities, temperature applied",
            "logits": "float32 [batch, classes] ([batch, 1] for a binary head): raw head output, "
            "before temperature",
            **(
                {
                    OOD_OUTPUT: "float32 [batch]: squared Mahalanobis distance to the closest "
                    "training class; above ood.threshold: looks like none of the classes"
                }
                if record.get("ood")
                else {}
            ),
        },
    }


def export(
    run_dir: str | os.PathLike,
    *,
    format: str = "onnx",
    output: str | os.PathLike | None = None,
    opset: int | None = None,
    check: bool = True,
    tolerance: float = TOLERANCE,
    max_images: int = 256,
    quantize: str | None = None,
    gate: dict | None = None,
) -> ExportResult:
    """Export a run folder's model and check parity against `headstart.load(run_dir)`.

    quantize="int8" (ONNX only) also writes RUN/model.int8.onnx behind the accuracy gate; `gate`
    passes options to `headstart.deploy.quantize.quantize_int8` (min_agreement, max_drop, ...).
    """
    if format not in FORMATS:
        raise ConfigError(f"Unknown export format {format!r}; use one of {', '.join(FORMATS)}.")
    if quantize not in (None, "int8") or (quantize and format != "onnx"):
        raise ConfigError(
            f"--quantize {quantize} works with --format onnx and 'int8' only; got --format {format}."
        )
    run_dir = Path(run_dir)
    require_finished(run_dir)
    record = read_json(run_dir / MODEL_JSON)
    path = Path(output) if output else run_dir / DEFAULT_NAMES[format]
    original = load(run_dir, device="cpu", fast=False)  # parity: fp32 CPU, the model as stored
    pp = original.preprocess
    t0 = time.perf_counter()
    if format == "safetensors":
        exporter = "safetensors"
        path.mkdir(parents=True, exist_ok=True)
        save_weights(path / WEIGHTS, original.model.state_dict(), {"format": 1})
        shutil.copyfile(run_dir / MODEL_JSON, path / MODEL_JSON)
        meta_path = path / MODEL_JSON
    else:
        module = ExportModule(original.model, pp, original.temperature, original.model.head_spec.kind,
                              original.distance).eval()  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        if format == "onnx":
            exporter = _export_onnx(module, path, input_size=pp.input_size, opset=opset or DEFAULT_OPSET)
            meta = export_metadata(record, fmt=format, exporter=exporter)
            set_onnx_metadata(path, meta)
        else:
            exporter = "torch.jit.trace"
            meta = export_metadata(record, fmt=format, exporter=exporter)
            _export_torchscript(module, path, input_size=pp.input_size, meta=meta)
        meta_path = path.with_name(path.name + ".json")
        write_json(meta_path, meta)
    seconds = time.perf_counter() - t0
    parity = None
    if check:
        parity = check_parity(original, _runner(format, path), run_dir=run_dir, tolerance=tolerance,
                              max_images=max_images)  # fmt: skip
        if not parity.passed:
            rejected = _reject(path, meta_path)
            raise ExportParityError(
                f"The {format} export does not reproduce the original model: {parity.describe()}. "
                f"Required: 100% top-1 agreement and max |dp| <= {tolerance:.0e}. The file was moved "
                f"to {str(rejected)!r} so that nothing picks it up; do not deploy it. Try another "
                "--format or --opset, or report the backbone and format as a bug."
            )
    result = ExportResult(path, format, meta_path, parity, exporter, seconds)
    if quantize:
        from headstart.deploy.quantize import quantize_int8

        result.int8 = quantize_int8(run_dir, path, **(gate or {}))
    return result


def _reject(path: Path, meta_path: Path) -> Path:
    """Move a failed export aside (PATH.rejected) and drop its sidecar JSON."""
    rejected = path.with_name(path.name + ".rejected")
    if rejected.is_dir():
        shutil.rmtree(rejected)
    os.replace(path, rejected)
    if meta_path.exists() and meta_path.parent != rejected:
        meta_path.unlink()
    return rejected


def _export_onnx(module: ExportModule, path: Path, *, input_size: int, opset: int) -> str:
    """torch.export-based exporter (torch.onnx.export(dynamo=True)); batch dimension dynamic."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"ONNX export needs the onnx extra ({e.name} is missing): pip install 'headstart[onnx]'."
        ) from e
    x = torch.rand(2, 3, input_size, input_size)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (x,), str(path), dynamo=True, external_data=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=module.output_names,
            dynamic_shapes={"image": {0: batch}}, verbose=False,
        )  # fmt: skip
    return f"torch.onnx.export(dynamo=True) torch {torch.__version__}, opset {opset}"


def _export_torchscript(module: nn.Module, path: Path, *, input_size: int, meta: dict) -> None:
    """torch.jit.trace at the static input size; batch stays free (no op depends on it)."""
    x = torch.rand(2, 3, input_size, input_size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, (x,), check_trace=False)
        traced = torch.jit.freeze(traced.eval())
        tmp = path.with_name(f".{path.name}.tmp")
        torch.jit.save(traced, str(tmp), _extra_files={"headstart.json": json.dumps(meta)})
    os.replace(tmp, path)


def _runner(fmt: str, path: Path) -> Callable[[torch.Tensor], np.ndarray]:
    """A function [0,1] batch -> probabilities, running the exported artefact."""
    if fmt == "onnx":
        session = onnx_session(path)
        return lambda x: session.run([OUTPUT_NAMES[0]], {INPUT_NAME: x.numpy()})[0]
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in torch 2.x
            ts = torch.jit.load(str(path), map_location="cpu").eval()

        def run_ts(x: torch.Tensor) -> np.ndarray:
            with torch.inference_mode():
                return ts(x)[0].numpy()

        return run_ts
    copy = load(path, device="cpu", fast=False)  # the same tensors: parity must be exact
    norm = T.Normalize(copy.preprocess.mean, copy.preprocess.std)
    return lambda x: copy.predict_tensor(norm(x)).numpy()


def parity_images(run_dir: Path, *, max_images: int, seed: int = 0) -> tuple[list, str, list[str]]:
    """PIL images for the parity check: the run's validation files, else generated ones."""
    from PIL import Image

    split_path = run_dir / SPLIT
    pils, skipped = [], []
    if split_path.exists():
        val = [p for p, _ in read_json(split_path).get("val", [])]
        for p in val:
            if len(pils) >= max_images:
                break
            try:
                pils.append(load_image(p))
            except Exception as e:  # noqa: BLE001 - reported, the check goes on with the rest
                skipped.append(f"{p}: {type(e).__name__}: {e}")
        if pils:
            return pils, f"validation files from {SPLIT}", skipped
    rng = np.random.default_rng(seed)
    for i in range(min(max_images, 32)):
        h, w = int(rng.integers(64, 400)), int(rng.integers(64, 400))
        base = rng.integers(0, 256, 3)[None, None, :]
        arr = np.clip(base + rng.normal(0, 60, (h, w, 3)) * (i % 4) / 3, 0, 255).astype(np.uint8)
        pils.append(Image.fromarray(arr))
    return pils, "generated images (no readable validation files in split.json)", skipped


def check_parity(
    original,
    run_exported: Callable[[torch.Tensor], np.ndarray],
    *,
    run_dir: Path,
    tolerance: float = TOLERANCE,
    max_images: int = 256,
    batch_size: int = 32,
) -> Parity:
    """Compare probabilities of the original predictor and an exported model on the same images."""
    pils, source, skipped = parity_images(run_dir, max_images=max_images)
    t01 = eval_transform(original.preprocess, normalize=False)
    norm = T.Normalize(original.preprocess.mean, original.preprocess.std)
    diffs, agree = [], 0
    for i in range(0, len(pils), batch_size):
        x01 = torch.stack([t01(p) for p in pils[i : i + batch_size]])
        ref = original.predict_tensor(norm(x01)).numpy()
        got = np.asarray(run_exported(x01))
        diffs.append(float(np.abs(ref - got).max()))
        agree += int((ref.argmax(1) == got.argmax(1)).sum())
    return Parity(len(pils), source, max(diffs), agree / len(pils), tolerance, skipped)


def parity_dict(p: Parity) -> dict:
    """Plain-JSON form, with the verdict."""
    return {**asdict(p), "passed": p.passed}
