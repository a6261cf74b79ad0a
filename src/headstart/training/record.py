"""RunResults: the typed record of a finished run (results.json), built in one place and read by the
report, compare and the API. docs/run-folder.md lists its fields, from this class."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from headstart.core.files import RESULTS, read_json, write_json


def _f(default: Any = None, doc: str = "", factory: Any = None) -> Any:
    if factory is not None:
        return field(default_factory=factory, metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class RunResults:
    """results.json. Fields that do not apply to a run are None and left out of the file."""

    val_accuracy: float | None = _f(doc="validation accuracy of the saved weights")
    val_loss: float | None = _f(doc="validation cross-entropy of the saved weights")
    val_balanced_accuracy: float | None = _f(
        doc="mean recall over the classes in the validation split (equals accuracy when balanced)"
    )
    val_confusion: list[list[int]] | None = _f(
        doc="val confusion matrix of the saved weights (rows true, columns predicted; up to 100 classes)"
    )
    best_epoch: int | None = _f(
        doc="epoch whose weights were saved (best validation accuracy; balanced accuracy with "
        "`--class-weights balanced`; the last with `--keep-epoch last`)"
    )
    epochs_run: int | None = _f(doc="epochs trained (fewer than --epochs after an early stop)")
    epochs_trained: float | None = _f(
        doc="epochs trained, a last epoch that a --budget cut short counting as its share of batches "
        "(4.69: 69 % of the fifth)"
    )
    train_seconds: float | None = _f(doc="wall time of the whole run")
    extract_seconds: float | None = _f(doc="time spent computing features or cached prefix maps")
    head_train_seconds: float | None = _f(doc="time spent fitting the head on cached features")
    train_loop_seconds: float | None = _f(doc="time spent in the epochs (backbone strategies)")
    cache_hit_rate: float | None = _f(doc="share of features or prefix maps read from the cache")
    features_extracted: int | None = _f(doc="features (or maps) computed by the backbone in this run")
    features_from_cache: int | None = _f(doc="features (or maps) read from the cache")
    cache_rows_recomputed: int | None = _f(doc="cached rows found damaged (or missing) and computed again")
    cache_prefix: bool | None = _f(doc="finetune --cache-prefix: trained on cached prefix maps")
    prefix_split: str | None = _f(
        doc="finetune: first module of the trainable suffix (the frozen prefix before it is cached or run "
        "on the frozen engine)"
    )
    prefix_map_shape: list[int] | None = _f(doc="--cache-prefix: shape (C, H, W) of one cached map")
    frozen_engine: dict | None = _f(
        doc="what computed the frozen features, maps or prefix: name (torch, onnxruntime), why, parity with "
        "PyTorch"
    )
    strategy: str | None = _f(doc="--strategy")
    classifier: str | None = _f(doc="linear-probe: logistic or svm")
    probe_C: float | None = _f(doc="linear-probe: regularisation strength chosen by cross-validation")
    probe_cv_score: float | None = _f(doc="linear-probe: cross-validation score of that C")
    probe_cv_folds: int | None = _f(doc="linear-probe: folds of the cross-validation")
    probe_cv_samples: int | None = _f(doc="linear-probe: training images the cross-validation used")
    cache_views: int | None = _f(doc="--cache-views: feature views per training image")
    backbone: str | None = _f(doc="backbone name")
    head: str | None = _f(doc="head layer widths, e.g. 1280→2")
    unfrozen_modules: list[str] = _f(doc="backbone modules that trained", factory=list)
    trainable_params: int | None = _f(doc="parameters that trained")
    frozen_params: int | None = _f(doc="parameters that stayed frozen")
    frozen_tensors_checked: int | None = _f(doc="frozen tensors (parameters and BN statistics) checksummed")
    frozen_tensors_changed: int | None = _f(doc="frozen tensors that changed: 0, or the run fails")
    trainable_tensors_checked: int | None = _f(doc="trainable tensors checksummed")
    trainable_tensors_changed: int | None = _f(doc="trainable tensors that changed")
    device: str | None = _f(doc="device trained on")
    num_train: int | None = _f(doc="training images listed")
    num_val: int | None = _f(doc="validation images listed")
    classes: list[str] = _f(doc="class names in label order", factory=list)
    skipped_files: list[dict] = _f(doc="files left out, each {path, reason}", factory=list)
    resumes: int = _f(0, doc="times the run was resumed from a checkpoint")
    world_size: int | None = _f(doc="processes under torchrun (absent for one process)")
    calibration: dict | None = _f(
        doc="`headstart calibrate`: temperature with ECE and NLL before/after; `sets` (conformal threshold, "
        "held-out coverage, set sizes) and `ood` (rejection threshold, held-out acceptance) when fitted"
    )
    plan: dict | None = _f(
        doc="--strategy auto: what was measured, every candidate's inner score and time, "
        "the chosen recipe, predicted and actual time of each stage"
    )

    def to_dict(self) -> dict:
        """results.json content: None fields left out."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict) -> RunResults:
        """From results.json of any version: unknown keys are ignored, missing ones None."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def read(cls, run_dir: str | os.PathLike) -> RunResults:
        """RUN/results.json."""
        return cls.from_dict(read_json(Path(run_dir) / RESULTS))

    def write(self, run_dir: str | os.PathLike) -> None:
        """Write RUN/results.json atomically."""
        write_json(Path(run_dir) / RESULTS, self.to_dict())

    @classmethod
    def schema(cls) -> list[tuple[str, str, str]]:
        """(field, type, meaning) of every field: the documented schema of results.json."""
        return [(f.name, str(f.type), f.metadata["doc"]) for f in dataclasses.fields(cls)]


@dataclass
class TrainResult:
    """What `train` returns: where the run lives, its results and its per-epoch metrics."""

    run_dir: Path
    results: RunResults
    metrics: list[dict]

    def __getitem__(self, key: str) -> Any:
        """result["val_accuracy"]: a results.json value by name (KeyError when the run has none)."""
        value = getattr(self.results, key, None)
        if value is None:
            raise KeyError(key)
        return value

    def load(self, device: str = "auto"):
        """The trained model as a Predictor."""
        from headstart.inference.predictor import load

        return load(self.run_dir, device=device)
