"""The engine that runs frozen work (pooled features, cached prefix maps): PyTorch or ONNX Runtime.

Frozen modules take uint8 images and normalise inside the engine: loader processes then hand over a
quarter of the bytes, and on CUDA the normalisation runs on the GPU. On a CPU, ONNX Runtime runs the
EfficientNets about 3x faster than PyTorch (docs/benchmarks.md, benchmark (c)). The frozen module is
exported once (torch.onnx dynamo exporter, about 6 s on 2 cores), kept beside the feature cache,
and used only after its output on the first real batch matches PyTorch's.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from headstart.core import logs
from headstart.core.device import autocast_for, available_cores
from headstart.core.errors import ConfigError
from headstart.data.transforms import Preprocess
from headstart.models.fastpath import inference_model

ENGINES = ("auto", "torch", "onnxruntime")
ORT = "onnxruntime"
# Below this many images, exporting (about 6 s per frozen part) costs more than it saves: ONNX
# Runtime saves about 7 ms per ant/bee photo end to end on 2 cores (~850 images to break even).
MIN_IMAGES_FOR_ORT = 1000
# Relative parity: far below the float16 rounding (~5e-4) of the cached rows, so rows of either
# engine are interchangeable where they are stored.
PARITY_RTOL = 1e-4


class EngineUnavailable(RuntimeError):
    """ONNX Runtime could not take the frozen module (export failed or outputs disagree)."""


@dataclass(frozen=True)
class EngineChoice:
    """Which engine a run's frozen work uses, decided before any cache is opened (it joins the key)."""

    name: str  # "torch" or "onnxruntime"
    strict: bool = False  # asked for by name: a failure is an error, not a fallback to PyTorch
    note: str = ""


def choose_engine(
    want: str, device: torch.device, n_images: int, *, compile: bool = False, exported: bool = False
) -> EngineChoice:
    """auto: ONNX Runtime on a CPU when it is installed, for 1000+ images or when this frozen part
    is already `exported` (no export cost left to pay); PyTorch otherwise."""
    if want not in ENGINES:
        raise ConfigError(f"--frozen-engine {want!r}: use one of {', '.join(ENGINES)}.")
    if want == "torch":
        return EngineChoice("torch", note="asked for")
    if device.type != "cpu":
        if want == ORT:
            raise ConfigError(
                f"--frozen-engine onnxruntime runs on the CPU, but the device is {device}. "
                "Use --frozen-engine auto (PyTorch on the GPU) or --device cpu."
            )
        return EngineChoice("torch", note=f"PyTorch on {device.type}")
    missing = _missing_ort()
    if want == ORT:
        if missing:
            raise ConfigError(f"--frozen-engine onnxruntime needs {missing}: pip install 'headstart[onnx]'.")
        return EngineChoice(ORT, strict=True, note="asked for")
    if compile:
        return EngineChoice("torch", note="--compile asks for torch.compile")
    if missing:
        return EngineChoice("torch", note=f"{missing} is not installed (pip install 'headstart[onnx]')")
    if exported:
        return EngineChoice(ORT, note="this frozen part was exported before")
    if n_images < MIN_IMAGES_FOR_ORT:
        return EngineChoice("torch", note=f"{n_images} images: exporting would cost more than it saves")
    return EngineChoice(ORT, note=f"{n_images} images on the CPU")


def _missing_ort() -> str | None:
    import importlib.util

    for name in ("onnxruntime", "onnx", "onnxscript"):
        if importlib.util.find_spec(name) is None:
            return name
    return None


class Normalized(nn.Module):
    """uint8 images [B, 3, H, W] -> the module's output on (x / 255 - mean) / std."""

    def __init__(self, module: nn.Module, pp: Preprocess):
        super().__init__()
        self.module = module
        self.register_buffer("mean", torch.tensor(pp.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(pp.std).view(1, 3, 1, 1) * 255.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise, then run the module."""
        return self.module((x.float() - self.mean) / self.std)


def fall_back(error: EngineUnavailable, choice: EngineChoice) -> EngineChoice:
    """PyTorch after ONNX Runtime turned out unable (said as a warning), or a ConfigError where
    ONNX Runtime was asked for by name."""
    if choice.strict:
        raise ConfigError(
            f"--frozen-engine onnxruntime: {error}. Use --frozen-engine auto or torch."
        ) from error
    logs.warning(f"{error}; computing with PyTorch instead")
    return EngineChoice("torch", note=str(error))


@dataclass
class FrozenEngine:
    """Runs a frozen module on uint8 batches; `record` goes into results.json."""

    run: Callable[[torch.Tensor], np.ndarray]  # uint8 [B, 3, H, W] -> float32 [B, D]
    record: dict


def torch_runner(module: nn.Module, pp: Preprocess, device: torch.device, *, compile: bool = False):
    """The PyTorch fast path (BN folded, channels-last) on uint8 batches, normalised on the device."""
    net = Normalized(inference_model(module, device, compile=compile), pp).to(device)

    @torch.inference_mode()
    def run(x: torch.Tensor) -> np.ndarray:
        # channels-last on the uint8 batch: the normalisation keeps the layout the fast path wants
        x = x.to(device, non_blocking=device.type == "cuda").contiguous(memory_format=torch.channels_last)
        with autocast_for(device):
            return net(x).float().cpu().numpy()

    return run


def build_engine(
    choice: EngineChoice,
    module: nn.Module,
    pp: Preprocess,
    device: torch.device,
    first: torch.Tensor,
    *,
    key: dict,
    store: Path | None,
    compile: bool = False,
) -> FrozenEngine:
    """The engine for `choice`, checked on `first` (the first real batch) against PyTorch.

    ONNX Runtime failures raise EngineUnavailable; the caller falls back to PyTorch unless strict.
    """
    reference = torch_runner(module, pp, device, compile=compile)
    if choice.name != ORT:
        return FrozenEngine(reference, {"name": "torch", "note": choice.note})
    try:
        if store is None:  # no cache to keep it in: the session holds the graph, the file can go
            with tempfile.TemporaryDirectory(prefix="headstart-engine-") as tmp:
                session = ort_session(export_frozen(module, pp, key=key, folder=Path(tmp)))
        else:
            session = ort_session(export_frozen(module, pp, key=key, folder=store))
        ours = session.run(None, {"image": first.numpy()})[0]
    except Exception as e:  # noqa: BLE001 - an export fails in many ways; each means "use PyTorch"
        if store is not None:  # a damaged file would fail every run: the next one exports again
            engine_path(key, store).unlink(missing_ok=True)
        why = f"{type(e).__name__}: {e}"
        raise EngineUnavailable(f"ONNX Runtime could not run the frozen part ({why})") from e
    ref = reference(first)
    if ours.shape != ref.shape:
        raise EngineUnavailable(f"ONNX Runtime gives shape {ours.shape}, PyTorch {ref.shape}")
    diff = float(np.abs(ours - ref).max()) if ref.size else 0.0
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    if diff > PARITY_RTOL * max(scale, 1.0):
        raise EngineUnavailable(
            f"ONNX Runtime disagrees with PyTorch on the first {len(first)} images "
            f"(max difference {diff:.2e} at scale {scale:.2f}, allowed {PARITY_RTOL:.0e} of it)"
        )

    def run(x: torch.Tensor) -> np.ndarray:
        return session.run(None, {"image": x.numpy()})[0]

    record = {"name": ORT, "note": choice.note, "parity_images": len(first),
              "parity_max_abs_diff": float(f"{diff:.3g}"), "parity_scale": round(scale, 4)}  # fmt: skip
    logs.info(f"frozen engine: ONNX Runtime (matches PyTorch on {len(first)} images, max diff {diff:.1e})")
    return FrozenEngine(run, record)


class EngineSource:
    """Builds the engine once, at the first batch that needs computing; remembers what it built."""

    def __init__(self, choice: EngineChoice, module: nn.Module, pp: Preprocess, device: torch.device, *,
                 key: dict, store: Path | None, compile: bool = False):  # fmt: skip
        self.choice, self.module, self.pp, self.device = choice, module, pp, device
        self.key, self.store, self.compile = key, store, compile
        self.engine: FrozenEngine | None = None

    def get(self, first: torch.Tensor) -> FrozenEngine:
        """The engine, built (and parity-checked) on the first call with that call's batch."""
        if self.engine is None:
            self.engine = build_engine(self.choice, self.module, self.pp, self.device, first,
                                       key=self.key, store=self.store, compile=self.compile)  # fmt: skip
        return self.engine

    @property
    def record(self) -> dict:
        """What results.json says of the engine (also when every row came from the cache)."""
        if self.engine is not None:
            return self.engine.record
        return {"name": self.choice.name, "note": "every row came from the cache"}


def engine_path(key: dict, folder: Path) -> Path:
    """Where the ONNX graph of the frozen part identified by `key` is kept."""
    spec = json.dumps({**key, "engine": "onnx-uint8", "torch": torch.__version__}, sort_keys=True)
    return folder / (hashlib.sha256(spec.encode()).hexdigest()[:24] + ".onnx")


def export_frozen(module: nn.Module, pp: Preprocess, *, key: dict, folder: Path) -> Path:
    """The frozen module as ONNX (uint8 in, normalised inside), exported once per key into `folder`."""
    path = engine_path(key, folder)
    name = path.name
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.{os.getpid()}.tmp"
    wrapped = Normalized(module, pp).eval().cpu()
    gen = torch.Generator().manual_seed(0)  # the global RNG (shuffles, flips) stays untouched
    x = torch.randint(0, 256, (2, 3, pp.input_size, pp.input_size), dtype=torch.uint8, generator=gen)
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapped, (x,), str(tmp), dynamo=True, external_data=False, input_names=["image"],
                output_names=["out"], dynamic_shapes={"x": {0: batch}}, verbose=False,
            )  # fmt: skip
        os.replace(tmp, path)  # concurrent runs may race: each writes its own tmp, the last wins
    finally:
        tmp.unlink(missing_ok=True)
    return path


def ort_session(path: Path):
    """An ONNX Runtime CPU session for frozen work: every core, no spinning."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = available_cores()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Spinning threads would take the cores the image decoders need between batches.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
