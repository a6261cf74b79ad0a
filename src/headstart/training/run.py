"""Training, top to bottom: `train()` -> `run()`:

resolve the options -> pick the strategy plug-in -> set up the run (data, model, freezing, proof)
-> the strategy prepares its inputs -> the strategy fits -> `finish`: best weights back, verify the
frozen proof, calibrate if asked, save model.safetensors, model.json, results.json.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from headstart.core import logs
from headstart.core.distributed import barrier, shutdown
from headstart.core.errors import DiskFull
from headstart.core.files import CHECKPOINT, CONFIG, read_json
from headstart.core.metrics import balanced_accuracy, calibration_summary, fit_temperature, unlearnt_classes
from headstart.data.layout import DataSplit
from headstart.models.freezing import compact_names
from headstart.models.store import save_model
from headstart.training.loop import logits_of, skipped
from headstart.training.options import TrainConfig, as_config
from headstart.training.record import RunResults, TrainResult
from headstart.training.rundir import recorded, set_status, write_run_config
from headstart.training.setup import Run, setup_run
from headstart.training.strategies import select
from headstart.training.strategies.base import Fitted, Inputs


def train(
    data: str | os.PathLike | None = None,
    *,
    output: str | os.PathLike | None = None,
    config: TrainConfig | Mapping[str, Any] | str | os.PathLike | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train a transfer model on an image folder and write the run folder.

    `config` is a TrainConfig, a mapping of options or a YAML/JSON file (a run's config.json
    re-runs that run); `overrides` are TrainConfig fields (augmentation fields may be given flat,
    e.g. hflip=False). An unknown name raises ConfigError with the nearest valid ones.
    """
    given = {k: v for k, v in (("data", data), ("output", output)) if v is not None}
    cfg = as_config(config).with_overrides({**{k: str(v) for k, v in given.items()}, **overrides})
    return run(cfg)


def resume(run_dir: str | os.PathLike, *, num_workers: int | None = None) -> TrainResult:
    """Continue a stopped or killed run from its checkpoint, with the options in its config.json
    (loader processes may change: they do not change the result)."""
    run_dir = Path(run_dir)
    cfg = TrainConfig.from_dict(read_json(run_dir / CONFIG)["options"])
    cfg.output = str(run_dir)
    if num_workers is not None:
        cfg.num_workers = num_workers
    return run(cfg, resume=True)


def run(cfg: TrainConfig, *, resume: bool = False, split: DataSplit | None = None) -> TrainResult:
    """Train from a TrainConfig: the body of `train` and `resume`. `split` replaces the data folder's
    own split (auto's pilots train on an inner split of the training images)."""
    cfg = cfg.resolved()
    strategy = select(cfg)
    pilot = split is not None  # auto's pilots: their inner splits are the plan's business, not the user's
    plan = None
    if hasattr(strategy, "choose") and not resume:  # auto: choose the recipe, then train it in the budget
        plan = strategy.choose(cfg, run=run)
        cfg, split = plan.config.resolved(), plan.split
    strategy = select(cfg)
    with torch_settings(deterministic=cfg.deterministic), recorded(Path(cfg.output)):
        r = setup_run(
            cfg,
            strategy,
            resume=resume,
            split=split,
            plan=plan.record if plan else None,
            deadline=plan.deadline if plan else None,
            most_epochs=plan.most_epochs if plan else None,
        )
        try:
            inputs = strategy.inputs(r)
            fitted = strategy.fit(r, inputs)
            result = finish(r, inputs, fitted)
            confusion = fitted.val_confusion
            if not pilot and confusion and (warning := unlearnt_classes(confusion, r.split.classes)):
                logs.warning(warning)
            return result
        finally:
            shutdown(r.dist)


@contextlib.contextmanager
def torch_settings(*, deterministic: bool) -> Iterator[None]:
    """Process-wide torch settings for one run, restored afterwards (later runs start clean)."""
    before = torch.are_deterministic_algorithms_enabled()
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by CUDA matmuls
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def finish(run: Run, inputs: Inputs, fitted: Fitted) -> TrainResult:
    """Best weights back, frozen proof verified, calibration, model and results saved."""
    cfg, model = run.cfg, run.model
    if fitted.best_state is not None:
        model.load_state_dict(fitted.best_state, strict=False)
    proof = run.proof.verify(model)  # raises FrozenTensorChanged: nothing is saved
    calibration = calibrate(run, inputs) if cfg.calibrate and run.dist.is_main else None
    results = RunResults(
        val_accuracy=fitted.val_acc,
        val_loss=fitted.val_loss,
        val_balanced_accuracy=balanced_accuracy(fitted.val_confusion) if fitted.val_confusion else None,
        # up to 100 classes: 1,000 would put a million numbers in results.json
        val_confusion=fitted.val_confusion if len(run.split.classes) <= 100 else None,
        best_epoch=fitted.best_epoch,
        epochs_run=len(fitted.metrics),
        epochs_trained=len(fitted.metrics) if fitted.epochs_trained is None else fitted.epochs_trained,
        train_seconds=round(time.perf_counter() - run.started, 3),
        extract_seconds=round(inputs.seconds, 3),
        **{run.strategy.seconds_key: round(fitted.seconds, 3)},
        **inputs.stats,
        strategy=cfg.strategy,
        **fitted.extra,
        cache_views=cfg.cache_views,
        backbone=run.backbone.config.name,
        head=run.head_spec.describe(run.backbone.feature_dim, len(run.split.classes)),
        unfrozen_modules=compact_names(run.unfrozen),
        trainable_params=run.trainable_params,
        frozen_params=run.frozen_params,
        **{k: v for k, v in proof.items() if k != "changed_frozen_names"},
        device=str(run.device),
        num_train=len(run.split.train),
        num_val=len(run.split.val),
        classes=run.split.classes,
        skipped_files=[s.to_dict() for s in run.skipped + inputs.failed + skipped(fitted.bad_files)],
        resumes=fitted.resumes,
        plan=finished_plan(run, fitted),
        world_size=run.dist.world if run.dist.enabled else None,
        calibration=calibration,
    )
    if run.dist.is_main:
        save(run, results, calibration)
        (run.out / CHECKPOINT).unlink(missing_ok=True)  # the run is complete: model.safetensors is the result
        set_status(run.out, "finished")
    barrier(run.dist)
    bal = results.val_balanced_accuracy
    balanced = f", balanced {bal:.4f}" if bal is not None and abs(bal - results.val_accuracy) >= 0.01 else ""
    logs.info(
        f"done: val accuracy {results.val_accuracy:.4f}{balanced} (epoch {results.best_epoch}), "
        f"frozen tensors changed {results.frozen_tensors_changed}/{results.frozen_tensors_checked}, "
        f"{results.train_seconds:.1f}s -> {run.out}"
    )
    return TrainResult(run.out, results, fitted.metrics)


def finished_plan(run: Run, fitted: Fitted) -> dict | None:
    """auto's plan record with the final run's actual time and whether the budget cut it short."""
    if run.plan is None:
        return None
    seconds = round(time.perf_counter() - run.started, 1)
    return run.plan | {
        "final": run.plan.get("final", {}) | {"actual_seconds": seconds, "stopped_by_budget": run.out_of_time}
    }


def save(run: Run, results: RunResults, calibration: dict | None) -> None:
    """model.safetensors, model.json, results.json, config.json; a full disk keeps the checkpoint."""
    try:
        temperature = calibration["temperature"] if calibration else 1.0
        save_model(run.out, run.model, run.preprocess, strategy=run.cfg.strategy, temperature=temperature)
        results.write(run.out)
        write_run_config(run.out, run.cfg.to_dict(), run.device, world_size=run.dist.world)
    except DiskFull as e:
        then = (
            f"its checkpoint is kept: free space, then `headstart train --resume {run.out}` saves it"
            if (run.out / CHECKPOINT).exists()
            else "free space and train again"
        )
        raise DiskFull(f"{e} Training had finished; {then}.") from e


def calibrate(run: Run, inputs: Inputs) -> dict:
    """`--calibrate`: a temperature fitted on the val logits of the saved weights (ECE/NLL before/after)."""
    logits, y = logits_of(inputs.net, inputs, run)
    summary = calibration_summary(
        logits, y, run.head_spec.kind, fit_temperature(logits, y, run.head_spec.kind)
    )
    return {k: v for k, v in summary.items() if not k.startswith("reliability")} | {
        "previous_temperature": 1.0,
        "data": "validation split of the run",
        "skipped_files": [],
    }
