"""Prediction with ONNX Runtime from an exported model alone (no run folder, no PyTorch weights),
and the contract an exported model keeps: input/output names and the headstart metadata."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from headstart.core.device import available_cores
from headstart.core.errors import ConfigError, DataError
from headstart.core.files import atomic_write_bytes
from headstart.data.transforms import Preprocess, eval_transform
from headstart.inference.predictor import Predictor, load
from headstart.inference.uncertainty import ConformalSets, Rejection

INPUT_NAME, OUTPUT_NAMES = "image", ("probabilities", "logits")
OOD_OUTPUT = "ood_score"  # only in models of runs calibrated for rejection
ENGINES = ("torch", "onnx")


def read_onnx_metadata(path: str | os.PathLike) -> dict:
    """The headstart metadata stored in an exported ONNX model."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    out = {}
    for p in proto.metadata_props:
        try:
            out[p.key] = json.loads(p.value)
        except json.JSONDecodeError:
            out[p.key] = p.value
    return out


def set_onnx_metadata(path: Path, meta: dict) -> None:
    """Write the metadata into the model's metadata_props (one JSON value per key); drop the
    exporter's per-node debug metadata."""
    import onnx

    proto = onnx.load(str(path))
    # torch's exporter tags every node with its Python stack trace and module path: this machine's
    # file paths in a file meant to be shipped, and 0.4 MB of lite0's 16.9 (int8: 5.0)
    for node in proto.graph.node:
        del node.metadata_props[:]
    del proto.metadata_props[:]
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v if isinstance(v, str) else json.dumps(v)
    proto.doc_string = "headstart export: RGB [0,1] NCHW in, probabilities + logits out"
    atomic_write_bytes(path, proto.SerializeToString())


def _ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise ConfigError(
            "--engine onnx needs ONNX Runtime: pip install 'headstart[onnx]' (onnx, onnxruntime)."
        ) from e
    return onnxruntime


def onnx_session(path: str | os.PathLike | bytes, *, threads: int | None = None):
    """A CPU ONNX Runtime session of a file (or a serialized model); `threads` defaults to the cores
    this process may use."""
    ort = _ort()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or available_cores()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def resolve_onnx_path(run_or_file: str | os.PathLike) -> Path:
    """RUN/model.onnx for a run folder, or the .onnx file itself."""
    p = Path(run_or_file)
    path = p / "model.onnx" if p.is_dir() else p
    if not path.is_file():
        raise DataError(
            f"No ONNX model at {str(path)!r}. Export one first: headstart export {p} --format onnx "
            "(or pass the path of a .onnx file)."
        )
    return path


class OnnxPredictor(Predictor):
    """Same interface as `Predictor` (.predict, .iter_predict, .predict_proba), run by ONNX Runtime.

    Images are resized and centre-cropped in PIL exactly as for PyTorch, then fed as [0, 1] floats;
    the normalisation, head and temperature are inside the exported graph.
    """

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None):
        self.path = resolve_onnx_path(path)
        meta = read_onnx_metadata(self.path)
        if "classes" not in meta or "preprocessing" not in meta:
            raise DataError(
                f"{str(self.path)!r} has no headstart metadata (classes, preprocessing): it was not "
                "made by `headstart export`. Re-export it from the run folder."
            )
        self.record = meta
        self.preprocess = Preprocess.from_dict(meta["preprocessing"])
        self.classes = list(meta["classes"])
        self.temperature = float(meta.get("temperature", 1.0))
        self.head_kind = meta["head"]["kind"]
        self.device = torch.device("cpu")
        self.transform = eval_transform(self.preprocess, normalize=False)
        self.session = onnx_session(self.path, threads=threads)
        self.model = None
        self.sets = ConformalSets.from_dict(meta["conformal"]) if meta.get("conformal") else None
        self.rejection = Rejection.from_dict(meta["ood"]) if meta.get("ood") else None
        have = {o.name for o in self.session.get_outputs()}
        if self.rejection is not None and OOD_OUTPUT not in have:
            raise DataError(f"{str(self.path)!r} declares a rejection threshold but has no {OOD_OUTPUT!r} "
                            "output: it was changed after export. Export it again.")  # fmt: skip

    @property
    def tta(self) -> str:
        """The test-time views the exported graph computes (fixed at export)."""
        return self.record.get("tta", "none")

    def _run(self, x: torch.Tensor, *outputs: str) -> list[torch.Tensor]:
        x = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return [torch.from_numpy(a) for a in self.session.run(list(outputs), {INPUT_NAME: x})]

    def predict_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities [B, C] for a batch of [0, 1] images (resized and cropped), temperature inside."""
        return self._run(x, OUTPUT_NAMES[0])[0]

    def logits_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Raw head outputs (before temperature) for a batch of [0, 1] images."""
        return self._run(x, OUTPUT_NAMES[1])[0]

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Raw logits and, when the model carries a rejection threshold, its in-graph OOD scores."""
        if self.rejection is None:
            return self.logits_tensor(x), None
        logits, ood = self._run(x, OUTPUT_NAMES[1], OOD_OUTPUT)
        return logits, ood

    def __repr__(self) -> str:
        return f"OnnxPredictor({str(self.path)!r}, classes={self.classes})"


def load_onnx(path: str | os.PathLike, *, threads: int | None = None) -> OnnxPredictor:
    """An ONNX Runtime predictor from RUN/model.onnx or a .onnx file."""
    return OnnxPredictor(path, threads=threads)


def open_predictor(
    run: str | os.PathLike,
    *,
    engine: str = "torch",
    device: str = "auto",
    threads: int | None = None,
    tta: str | None = None,
) -> Predictor:
    """A predictor on an engine: 'torch' (the run folder) or 'onnx' (RUN/model.onnx, or a .onnx file);
    `tta` overrides the trained test-time views (torch engine: an exported graph holds its own)."""
    if engine not in ENGINES:
        raise ConfigError(f"Unknown engine {engine!r}; use one of {', '.join(ENGINES)}.")
    if threads:
        torch.set_num_threads(threads)
    if engine == "onnx":
        predictor = load_onnx(run, threads=threads)
        if tta is not None and tta != predictor.tta:
            raise ConfigError(
                f"--tta {tta} with --engine onnx: the exported graph computes the test-time views it was "
                f"exported with ({predictor.tta!r}) and cannot change them. Use --engine torch --tta {tta}."
            )
        return predictor
    predictor = load(run, device=device, tta=tta)
    if threads:
        torch.set_num_threads(threads)  # load() takes every core; an actor or server worker gets its share
    return predictor
