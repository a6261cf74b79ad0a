"""The training loop: read it top to bottom.

setup (seed, device, data, backbone, head, freezing, frozen proof)
-> [extract: run the frozen backbone once and train the head on its features]
-> per epoch: train, validate, log a metrics.csv row, keep the best weights, stop early if asked
   (a checkpoint after every epoch and every --checkpoint-every steps; --resume continues one)
-> verify the frozen proof -> save model.safetensors, model.json, results.json.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import platform
import random
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler, Subset
from tqdm.auto import tqdm

from headstart import __version__
from headstart.backbones import DEFAULT_BACKBONE, Backbone, create_backbone, with_feature_blocks
from headstart.cache import FeatureCache, default_cache_dir, model_key, weights_checksum
from headstart.checkpoint import (
    CHECKPOINT,
    ResumableSampler,
    StopRequest,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    tensor_fingerprint,
)
from headstart.data import (
    Augment,
    Batch,
    DataSplit,
    ImageDataset,
    Preprocess,
    Skipped,
    eval_transform,
    explain_failure,
    load_image,
    make_loader,
    resolve_data,
    train_transform,
)
from headstart.device import autocast_for, configure_threads, pick_device, to_device
from headstart.distributed import (
    DistInfo,
    all_gather_objects,
    all_sum,
    barrier,
    init_distributed,
    shard,
)
from headstart.errors import ConfigError, DataError, RunInterrupted, TrainingDiverged
from headstart.features import Features, cache_stats, extract_features
from headstart.freezing import (
    STRATEGIES,
    FrozenProof,
    apply_strategy,
    compact_names,
    count_params,
)
from headstart.heads import HeadSpec, make_loss
from headstart.model import TransferModel
from headstart.runs import CONFIG, METRICS, RESULTS, SPLIT, read_json, save_model, write_json

# Strategy-dependent defaults: a head on cached features is cheap, backbone epochs are not.
DEFAULT_EPOCHS = {"extract": 30, "finetune": 8, "full": 8, "scratch": 15, "linear-probe": 1}
DEFAULT_LR = {
    "extract": 1e-3,
    "finetune": 1e-3,
    "full": 3e-4,
    "scratch": 3e-3,
    "linear-probe": 1e-3,
}  # probe: unused


@dataclass
class TrainConfig:
    """Every option of a run; saved to config.json so the run can be reproduced."""

    data: str
    output: str
    val: str | None = None
    val_fraction: float = 0.2
    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None
    strategy: str = "extract"
    unfreeze: int = 2
    unfreeze_patterns: tuple[str, ...] = ()
    head: str = "linear"
    dropout: float = 0.0
    epochs: int | None = None
    batch_size: int = 32
    lr: float | None = None
    backbone_lr_mult: float = 0.1
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    momentum: float = 0.9
    schedule: str = "cosine"
    step_size: int | None = None
    label_smoothing: float = 0.0
    class_weights: str = "none"
    patience: int | None = None
    calibrate: bool = False
    seed: int = 0
    device: str = "auto"
    num_workers: int | None = None
    augment: Augment = field(default_factory=Augment)
    max_bad_fraction: float = 0.05
    overwrite: bool = False
    checkpoint_every: int | None = None
    deterministic: bool = False
    cache_dir: str | None = None
    cache: bool = True
    cache_views: int = 1  # extract/linear-probe: K feature views per training image (1 = eval view)
    classifier: str = "logistic"
    compile: bool = False
    image_size: int | None = None
    cache_prefix: bool = False  # finetune: cache the frozen prefix's maps, train the suffix on them
    feature_blocks: int = 1  # >1: features also average-pool the outputs of the last blocks

    def resolved(self) -> TrainConfig:
        """Fill strategy-dependent defaults and check values; raises ConfigError."""
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"Unknown strategy {self.strategy!r}; use one of {', '.join(STRATEGIES)}.")
        c = dataclasses.replace(self)
        if c.epochs is None:
            c.epochs = DEFAULT_EPOCHS[c.strategy]
        if c.lr is None:
            c.lr = DEFAULT_LR[c.strategy]
        for name, ok in (
            ("epochs", c.epochs >= 1),
            ("batch_size", c.batch_size >= 1),
            ("lr", c.lr > 0),
            ("label_smoothing", 0 <= c.label_smoothing < 1),
            ("max_bad_fraction", 0 <= c.max_bad_fraction <= 1),
            ("checkpoint_every", c.checkpoint_every is None or c.checkpoint_every >= 1),
            ("cache_views", c.cache_views >= 1),
            ("feature_blocks", c.feature_blocks >= 1),
        ):
            if not ok:
                raise ConfigError(f"--{name.replace('_', '-')} has an invalid value: {getattr(c, name)}.")
        if c.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"--optimizer {c.optimizer!r}: use adamw or sgd.")
        if c.schedule not in ("cosine", "step", "none"):
            raise ConfigError(f"--schedule {c.schedule!r}: use cosine, step or none.")
        if c.class_weights not in ("none", "balanced"):
            raise ConfigError(f"--class-weights {c.class_weights!r}: use none or balanced.")
        if c.cache_views > 1 and c.strategy not in ("extract", "linear-probe"):
            raise ConfigError(
                f"--cache-views {c.cache_views} applies to cached features (--strategy extract or "
                f"linear-probe); --strategy {c.strategy} sees a fresh augmentation every epoch already."
            )
        if c.cache_prefix and c.strategy != "finetune":
            raise ConfigError(
                f"--cache-prefix works only with --strategy finetune (got {c.strategy!r}): it caches "
                "the frozen first blocks and trains the unfrozen rest. Drop --cache-prefix."
            )
        if c.cache_prefix and c.feature_blocks > 1:
            raise ConfigError(
                f"--cache-prefix trains on the last block's pooled features only; --feature-blocks "
                f"{c.feature_blocks} pools earlier blocks too. Use one of the two."
            )
        return c

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        d = dataclasses.asdict(self)
        d["unfreeze_patterns"] = list(self.unfreeze_patterns)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Inverse of to_dict (options of config.json); unknown keys from other versions are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        d["augment"] = Augment(**d.get("augment", {}))
        d["unfreeze_patterns"] = tuple(d.get("unfreeze_patterns", ()))
        return cls(**d)


@dataclass
class TrainResult:
    """What `train` returns: the results.json content and where the run lives."""

    run_dir: Path
    results: dict
    metrics: list[dict]

    def __getitem__(self, key: str):
        return self.results[key]

    def load(self, device: str = "auto"):
        """The trained model as a Predictor."""
        from headstart.predict import load

        return load(self.run_dir, device=device)


def backbone_for(cfg: TrainConfig, *, weights: str | None) -> Backbone:
    """The run's backbone: cfg.backbone with `weights`, pooling cfg.feature_blocks blocks."""
    backbone = create_backbone(cfg.backbone, weights=weights)
    return with_feature_blocks(backbone, cfg.feature_blocks) if cfg.feature_blocks > 1 else backbone


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(data: str, *, output: str, **options) -> TrainResult:
    """Train a transfer model on an image folder and write the run folder; see TrainConfig."""
    aug = options.pop("augment", None)
    if isinstance(aug, dict):
        aug = Augment(**aug)
    unknown = set(options) - {f.name for f in dataclasses.fields(TrainConfig)}
    if unknown:
        raise ConfigError(f"Unknown train option(s): {', '.join(sorted(unknown))}.")
    cfg = TrainConfig(data=str(data), output=str(output), augment=aug or Augment(), **options)
    return run_training(cfg)


def resume(run_dir: str | Path) -> TrainResult:
    """Continue a stopped or killed run from its checkpoint, with the options in its config.json."""
    run_dir = Path(run_dir)
    cfg = TrainConfig.from_dict(read_json(run_dir / CONFIG)["options"])
    cfg.output = str(run_dir)
    return run_training(cfg, resume=True)


def run_training(cfg: TrainConfig, *, resume: bool = False) -> TrainResult:
    """Train from a TrainConfig; the body of `train`."""
    cfg = cfg.resolved()
    if cfg.compile:
        from headstart.fastpath import set_compile

        set_compile(True)
    if cfg.strategy == "linear-probe":
        from headstart.probe import run_linear_probe

        return run_linear_probe(cfg)
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    try:
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by CUDA matmuls
            torch.use_deterministic_algorithms(True)
        return _run_training(cfg, resume=resume)
    finally:
        torch.use_deterministic_algorithms(deterministic_before)


def _run_training(cfg: TrainConfig, *, resume: bool) -> TrainResult:
    t_start = time.perf_counter()
    device = pick_device(cfg.device)
    dist = init_distributed(device.type)  # torchrun: one process per device, rank 0 writes
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    if dist.is_main:
        out = prepare_output(cfg.output, overwrite=cfg.overwrite, resume=resume)
    else:
        out = Path(cfg.output)
    barrier(dist)
    seed_everything(cfg.seed)
    threads = configure_threads()
    if dist.is_main and not resume:
        write_json(out / CONFIG, run_config(cfg, device))  # --resume reads the options back

    # --- data (a resumed run reuses the exact file lists it started with)
    if resume and (out / SPLIT).is_file():
        split = DataSplit.from_dict(read_json(out / SPLIT))
    else:
        split = resolve_data(cfg.data, val=cfg.val, val_fraction=cfg.val_fraction, seed=cfg.seed)
        if dist.is_main:
            write_json(out / SPLIT, split.to_dict())

    # --- model: backbone (pretrained unless scratch), new head, freezing, frozen proof
    weights = "none" if cfg.strategy == "scratch" else cfg.weights
    backbone = backbone_for(cfg, weights=weights)
    head_spec = HeadSpec.parse(cfg.head, dropout=cfg.dropout)
    model = TransferModel.build(backbone, head_spec, split.classes)
    unfrozen = apply_strategy(model, cfg.strategy, unfreeze=cfg.unfreeze, patterns=cfg.unfreeze_patterns)
    trainable_params, frozen_params = count_params(model)
    proof = FrozenProof.take(model)
    model.to(device, memory_format=torch.channels_last)  # NHWC kernels: faster on CPU and GPU
    pp = preprocess_of(backbone, cfg.image_size)
    log(
        f"headstart {__version__}: {cfg.strategy} on {backbone.config.name} "
        f"({trainable_params:,} trainable / {frozen_params:,} frozen params), "
        f"head {head_spec.describe(backbone.feature_dim, len(split.classes))}, "
        f"{len(split.train)} train / {len(split.val)} val images, {len(split.classes)} classes, "
        f"device {device}, {threads} threads" + (f", {dist.world} processes" if dist.enabled else "")
    )

    class_w = class_weight_tensor(split, cfg.class_weights)
    loss_fn = make_loss(head_spec.kind, label_smoothing=cfg.label_smoothing, class_weights=class_w).to(device)

    # --- inputs: features (extract) or images (everything else)
    timings = {"extract_seconds": 0.0}
    skipped = list(split.skipped)
    feature_id = None
    feature_stats: dict = {}
    if cfg.strategy == "extract":
        net: nn.Module = model.head
        train_ds, val_ds, bad, timings["extract_seconds"], feature_stats = feature_datasets(
            backbone, split, pp, cfg, device, dist
        )
        check_bad_fraction(bad, split, cfg.max_bad_fraction)
        skipped += bad
        workers = 0
        feature_id = tensor_fingerprint(train_ds.x, val_ds.x)
    elif cfg.cache_prefix:  # the frozen prefix runs once per image; epochs train suffix + head
        from headstart.prefix import prefix_datasets

        pre = prefix_datasets(model, split, pp, cfg, device, dist)
        net, train_ds, val_ds, feature_stats, feature_id = pre.net, pre.train, pre.val, pre.stats, pre.key
        timings["extract_seconds"] = pre.seconds
        check_bad_fraction(pre.failed, split, cfg.max_bad_fraction)
        skipped += pre.failed
        workers = 0
    else:
        net = model
        draft = pp.resize_size
        train_ds = ImageDataset(split.train, train_transform(pp, cfg.augment), draft=draft, seed=cfg.seed)
        val_ds = ImageDataset(split.val, eval_transform(pp), draft=draft)
        workers = cfg.num_workers
    pin = device.type == "cuda"
    # The order is a function of (seed, epoch), so a resumed run can start mid-epoch exactly.
    # Under torchrun each rank trains on its DistributedSampler share (--batch-size is per
    # process) and validates a strided share of val; sums are all-reduced.
    if dist.enabled:
        sampler = DistributedSampler(train_ds, seed=cfg.seed)
    else:
        sampler = ResumableSampler(len(train_ds), seed=cfg.seed)
    per_rank = len(train_ds) // dist.world
    train_loader = make_loader(
        train_ds, batch_size=cfg.batch_size, shuffle=True, sampler=sampler,
        num_workers=workers, seed=cfg.seed, pin_memory=pin, drop_last=per_rank > cfg.batch_size,
    )  # fmt: skip
    val_loader = make_loader(
        Subset(val_ds, shard(list(range(len(val_ds))), dist)), batch_size=max(cfg.batch_size, 64),
        shuffle=False, num_workers=workers, pin_memory=pin,
    )  # fmt: skip
    steps_per_epoch = len(train_loader)
    if dist.enabled:
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=steps_per_epoch)

    # --- the loop, checkpointed (headstart.checkpoint) so --resume continues it exactly
    metrics: list[dict] = []
    best = {"val_acc": -1.0, "val_loss": math.inf, "epoch": 0, "state": None}
    bad_files: dict[str, str] = {}
    pos = {"epoch": 1, "totals": None, "resumes": 0}  # where the loop (re)starts
    ckpt_path = out / CHECKPOINT

    # under torchrun: rank 0 writes, epoch checkpoints only (DistributedSampler cannot start mid-epoch)
    step_checkpoints = cfg.checkpoint_every if not dist.enabled else None

    def checkpoint(epoch: int, totals: dict | None) -> None:
        if not dist.is_main:
            return
        save_checkpoint(ckpt_path, {
            "model": net.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler else None, "rng": rng_state(),
            "epoch": epoch, "totals": totals, "best": best, "metrics": metrics,
            "bad_files": bad_files, "feature_id": feature_id, "resumes": pos["resumes"],
        })  # fmt: skip

    if resume and ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path)
        restore_checkpoint(ck, net, optimizer, scheduler, feature_id=feature_id)
        best, metrics, bad_files = ck["best"], ck["metrics"], ck["bad_files"]
        pos.update(epoch=ck["epoch"], totals=ck["totals"], resumes=ck["resumes"] + 1)
        done = (pos["totals"] or {}).get("batches", 0)
        log(f"resumed from {ckpt_path} at epoch {pos['epoch']}, batch {done}")
    t_train = time.perf_counter()
    # signals stop cleanly after a step; under torchrun the launcher handles them
    with (
        open(out / METRICS if dist.is_main else os.devnull, "w", newline="") as fcsv,
        StopRequest() if not dist.enabled else contextlib.nullcontext() as stop,
    ):
        writer = csv.DictWriter(
            fcsv, ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]
        )
        writer.writeheader()
        writer.writerows(metrics)
        for epoch in range(pos["epoch"], cfg.epochs + 1):
            t0 = time.perf_counter()
            totals = pos["totals"] if epoch == pos["epoch"] and pos["totals"] else new_totals()
            if isinstance(sampler, ResumableSampler):
                sampler.set_epoch(epoch, start=totals["batches"] * cfg.batch_size)
            else:
                sampler.set_epoch(epoch)
            train_ds.epoch = epoch

            def after_step(totals: dict, epoch: int = epoch) -> None:
                step = (epoch - 1) * steps_per_epoch + totals["batches"]
                if len(bad_files) > cfg.max_bad_fraction * (len(split.train) + len(split.val)):
                    bad = [Skipped(p, r) for p, r in bad_files.items()]
                    check_bad_fraction(bad, split, cfg.max_bad_fraction, so_far=True)
                if stop or (step_checkpoints and step % step_checkpoints == 0):
                    checkpoint(epoch, totals)
                if stop:
                    raise interrupted(stop.signal, out, epoch, totals["batches"], steps_per_epoch)

            lr_now = optimizer.param_groups[0]["lr"] if not totals["batches"] else totals["lr"]
            totals["lr"] = lr_now
            tr = run_epoch(net, train_loader, loss_fn, device, head_spec.kind,
                           optimizer=optimizer, scheduler=scheduler, items=split.train,
                           bad_files=bad_files, desc=f"epoch {epoch}/{cfg.epochs}",
                           totals=totals, on_step=after_step, dist=dist)  # fmt: skip
            va = run_epoch(net, val_loader, loss_fn, device, head_spec.kind,
                           items=split.val, bad_files=bad_files, desc="val", dist=dist)  # fmt: skip
            if cfg.strategy != "extract":
                check_bad_fraction([Skipped(p, r) for p, r in bad_files.items()], split, cfg.max_bad_fraction)
            row = {
                "epoch": epoch,
                "train_loss": round(tr["loss"], 6),
                "train_acc": round(tr["acc"], 6),
                "val_loss": round(va["loss"], 6),
                "val_acc": round(va["acc"], 6),
                "lr": lr_now,
                "seconds": round(time.perf_counter() - t0, 3),
            }
            writer.writerow(row)
            fcsv.flush()
            metrics.append(row)
            improved = (va["acc"], -va["loss"]) > (best["val_acc"], -best["val_loss"])
            if improved:
                best.update(val_acc=va["acc"], val_loss=va["loss"], epoch=epoch,
                            state=trainable_state(model))  # fmt: skip
            log(
                f"epoch {epoch:>3}/{cfg.epochs}  train loss {tr['loss']:.4f} acc {tr['acc']:.4f}"
                f"  val loss {va['loss']:.4f} acc {va['acc']:.4f}  {row['seconds']:.1f}s"
                + ("  *" if improved else "")
            )
            stop_early = bool(cfg.patience and epoch - best["epoch"] >= cfg.patience)
            checkpoint(cfg.epochs + 1 if stop_early else epoch + 1, None)
            if stop_early:
                log(f"early stop: no val improvement for {cfg.patience} epochs")
                break
            if stop:
                raise interrupted(stop.signal, out, epoch + 1, 0, steps_per_epoch)
    timings["head_train_seconds" if cfg.strategy == "extract" else "train_loop_seconds"] = (
        time.perf_counter() - t_train
    )

    # --- best weights back, prove the frozen part stayed frozen, save
    images_loaded = cfg.strategy != "extract" and not cfg.cache_prefix  # else read once, up front
    if images_loaded and train_loader.drop_last and isinstance(sampler, ResumableSampler):
        bad_files.update(never_loaded_failures(sampler, cfg.batch_size, len(metrics), split.train))
    model.load_state_dict(best["state"], strict=False)
    frozen_report = proof.verify(model)
    skipped += [Skipped(p, r) for p, r in bad_files.items()]
    if dist.is_main:
        save_model(out, model, pp, strategy=cfg.strategy)
    results = {
        "val_accuracy": best["val_acc"],
        "val_loss": best["val_loss"],
        "best_epoch": best["epoch"],
        "epochs_run": len(metrics),
        "train_seconds": round(time.perf_counter() - t_start, 3),
        **{k: round(v, 3) for k, v in timings.items()},
        **feature_stats,
        "strategy": cfg.strategy,
        "backbone": backbone.config.name,
        "head": head_spec.describe(backbone.feature_dim, len(split.classes)),
        "unfrozen_modules": compact_names(unfrozen),
        "trainable_params": trainable_params,
        "frozen_params": frozen_params,
        **{k: v for k, v in frozen_report.items() if k != "changed_frozen_names"},
        "device": str(device),
        "num_train": len(split.train),
        "num_val": len(split.val),
        "classes": split.classes,
        "skipped_files": [s.to_dict() for s in skipped],
        "resumes": pos["resumes"],
    }
    if dist.enabled:
        results["world_size"] = dist.world
    if dist.is_main:
        write_json(out / RESULTS, results)
        write_json(out / CONFIG, run_config(cfg, device) | {"world_size": dist.world})
        ckpt_path.unlink(missing_ok=True)  # the run is complete: model.safetensors is the result
        if cfg.calibrate:  # temperature scaling on the val split; updates model.json and results.json
            from headstart.calibrate import calibrate

            results["calibration"] = calibrate(out, device=cfg.device, num_workers=cfg.num_workers)
    barrier(dist)
    log(
        f"done: val accuracy {results['val_accuracy']:.4f} (epoch {results['best_epoch']}), "
        f"frozen tensors changed {results['frozen_tensors_changed']}/"
        f"{results['frozen_tensors_checked']}, {results['train_seconds']:.1f}s -> {out}"
    )
    return TrainResult(out, results, metrics)


# ----------------------------------------------------------------------------- one epoch


def run_epoch(
    net: nn.Module,
    loader,
    loss_fn: nn.Module,
    device: torch.device,
    head_kind: str,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    items: list[tuple[str, int]] | None = None,
    bad_files: dict[str, str] | None = None,
    desc: str = "",
    totals: dict | None = None,
    on_step=None,
    dist: DistInfo = DistInfo(),
) -> dict:
    """One pass over `loader`; trains when an optimizer is given. Returns mean loss and accuracy.

    `totals` (running sums, updated in place) lets a resumed epoch continue its averages;
    `on_step(totals)` runs after each training batch (checkpoints, clean stop).
    """
    training = optimizer is not None
    net.train(training)
    t = totals if totals is not None else new_totals()
    grad = torch.enable_grad() if training else torch.inference_mode()
    bar = tqdm(loader, desc=desc, leave=False, disable=None if dist.is_main else True, unit="batch")
    with grad:
        for batch in bar:
            batch: Batch
            t["batches"] += 1
            if bad_files is not None and items is not None:
                bad_files.update({items[i][0]: why for i, why in batch.failed})
            if batch.x is None:
                if on_step is not None:
                    on_step(t)
                continue
            x, y = to_device(batch.x, device), to_device(batch.y, device)
            if x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast_for(device, training=training):
                logits = net(x)
                loss = loss_fn(logits, y)
            if not torch.isfinite(loss):
                files = [items[i][0] for i in batch.index.tolist()] if items else []
                raise TrainingDiverged(
                    f"The loss became {loss.item()} at this batch; training stopped before it "
                    f"could reach the saved model. Files in the batch: {', '.join(files[:8])}"
                    f"{' …' if len(files) > 8 else ''}. Lower --lr, or check these images."
                )
            if training:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                try:
                    optimizer.step()
                except RuntimeError as e:  # e.g. Adam's step size overflows float32 at --lr 1e38
                    if "overflow" not in str(e):
                        raise
                    raise TrainingDiverged(
                        f"The optimizer step overflowed ({e}); the learning rate "
                        f"{optimizer.param_groups[0]['lr']:g} is far too large. Lower --lr."
                    ) from e
                if scheduler is not None:
                    scheduler.step()
            n = y.numel()
            t["loss_sum"] += loss.item() * n
            t["correct"] += (predict_labels(logits, head_kind) == y).sum().item()
            t["seen"] += n
            bar.set_postfix(loss=f"{t['loss_sum'] / t['seen']:.4f}", acc=f"{t['correct'] / t['seen']:.3f}")
            if on_step is not None:
                on_step(t)
    bar.close()
    loss_sum, correct, seen = all_sum([t["loss_sum"], t["correct"], t["seen"]], dist, device)
    return {"loss": loss_sum / max(seen, 1), "acc": correct / max(seen, 1), "n": int(seen)}


def new_totals() -> dict:
    """Running sums of one epoch (saved in checkpoints so a resumed epoch averages the same)."""
    return {"batches": 0, "loss_sum": 0.0, "correct": 0, "seen": 0}


def predict_labels(logits: torch.Tensor, head_kind: str) -> torch.Tensor:
    """Predicted class indices from head outputs."""
    if head_kind == "binary":
        return (logits.reshape(-1) > 0).long()
    return logits.argmax(dim=1)


# ----------------------------------------------------------------------------- setup helpers


class _FeatureDataset(Dataset):
    """Cached features served in the same (x, label, index, error) form as images.

    With augmented `views` (each aligned row for row with `x`), every epoch serves one of the
    1 + len(views) views of each image, picked by (seed, epoch, index) so resumed runs match.
    """

    def __init__(
        self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, views: list[torch.Tensor] = (), seed=0
    ):
        self.x, self.y, self.index, self.views, self.seed = x, y, index, list(views), seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        x = self.x
        if self.views:
            v = zlib.crc32(f"{self.seed}:{self.epoch}:{int(self.index[i])}".encode()) % (1 + len(self.views))
            x = x if v == 0 else self.views[v - 1]
        return x[i].float(), int(self.y[i]), int(self.index[i]), None

    def all_views(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every view as a sample: (x, y, image index) for the linear probe."""
        k = 1 + len(self.views)
        return torch.cat([self.x, *self.views]), self.y.repeat(k), self.index.repeat(k)


def open_cache(
    cfg: TrainConfig, backbone, pp: Preprocess, views: str = "eval", **extra
) -> FeatureCache | None:
    """The feature cache for this backbone's exact weights and preprocessing (None if disabled).

    `extra` joins the key, e.g. the split point and map shape of cached prefix activations.
    """
    if not cfg.cache:
        return None
    spec = {
        "backbone": backbone.config.name,
        "arch": backbone.config.arch,
        "weights": weights_checksum(backbone),
        "preprocess": pp.to_dict(),
        "views": views,
        **extra,
    }
    if backbone.config.feature_blocks > 1:  # absent otherwise, so existing caches keep their keys
        spec["feature_blocks"] = backbone.config.feature_blocks
    root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    return FeatureCache(root, model_key(spec), spec)


def feature_datasets(backbone, split: DataSplit, pp: Preprocess, cfg: TrainConfig, device, dist):
    """Features of train and val (un-augmented views, plus cfg.cache_views - 1 augmented views of
    train), from the cache or computed once.

    Ranks of a torchrun job each extract a strided share, then gather. Returns the two datasets,
    the files that failed, the seconds spent and cache statistics for results.json.
    """
    tf = eval_transform(pp)
    cache = open_cache(cfg, backbone, pp)
    kw = dict(device=device, batch_size=64, num_workers=cfg.num_workers, draft=pp.resize_size, cache=cache)

    def features(items: list, desc: str) -> Features:  # each rank a strided share, then gathered
        f = extract_features(backbone, items, tf, desc=desc, subset=shard(range(len(items)), dist), **kw)
        return gather_features(f, dist)

    ftr, fva = features(split.train, "features train"), features(split.val, "features val")
    views = augmented_views(backbone, split, pp, cfg, ftr.index, dist, kw)
    parts = [ftr, fva, *views]
    secs, n = sum(p.seconds for p in parts), sum(len(p.y) for p in parts)
    stats = cache_stats(*parts)
    hits, misses = stats["features_from_cache"], stats["features_extracted"]
    where = f"cache {cache.dir}" if cache is not None else "no cache"
    log(
        f"features: {n} images in {secs:.1f}s, {misses} extracted ({misses / max(secs, 1e-9):.1f} img/s), "
        f"{hits} from {where} (hit rate {stats['cache_hit_rate']:.0%})"
    )
    if cache is not None:
        cache.close()
    # The feature datasets keep item indices, so failures and NaN reports still name files.
    return (
        _FeatureDataset(ftr.x, ftr.y, ftr.index, [align_rows(v, ftr) for v in views], seed=cfg.seed),
        _FeatureDataset(fva.x, fva.y, fva.index),
        ftr.failed + fva.failed,
        secs,
        stats,
    )


def augmented_views(backbone, split: DataSplit, pp: Preprocess, cfg: TrainConfig, ok, dist, kw) -> list:
    """Views 1..K-1 of the training images that loaded: the training augmentation, seeded by
    (seed, view, path), in their own cache (keyed by the augmentation and seed)."""
    if cfg.cache_views <= 1:
        return []
    spec = f"train-augment:{json.dumps(dataclasses.asdict(cfg.augment), sort_keys=True)}:seed={cfg.seed}"
    cache = open_cache(cfg, backbone, pp, views=spec)
    tf = train_transform(pp, cfg.augment)
    out = []
    try:
        for v in range(1, cfg.cache_views):
            f = extract_features(
                backbone, split.train, tf, desc=f"features train view {v}", view=v, augment_seed=cfg.seed,
                subset=shard(ok.tolist(), dist), **{**kw, "cache": cache},
            )  # fmt: skip
            out.append(gather_features(f, dist))
    finally:
        if cache is not None:
            cache.close()
    return out


def align_rows(view: Features, base: Features) -> torch.Tensor:
    """`view`'s features in `base`'s row order; an image missing from the view keeps its base row."""
    if torch.equal(view.index, base.index):
        return view.x
    row = {int(i): r for r, i in enumerate(view.index.tolist())}
    x = base.x.clone()
    for r, i in enumerate(base.index.tolist()):
        if i in row:
            x[r] = view.x[row[i]]
    return x


def gather_features(f: Features, dist: DistInfo) -> Features:
    """Join every rank's share of the features, back in item order."""
    if not dist.enabled:
        return f
    parts = all_gather_objects(f, dist)
    index = torch.cat([p.index for p in parts])
    order = torch.argsort(index)
    return Features(
        x=torch.cat([p.x for p in parts])[order],
        y=torch.cat([p.y for p in parts])[order],
        index=index[order],
        failed=[s for p in parts for s in p.failed],
        seconds=max(p.seconds for p in parts),
        hits=sum(p.hits for p in parts),
        misses=sum(p.misses for p in parts),
    )


def restore_checkpoint(ck: dict, net: nn.Module, optimizer, scheduler, *, feature_id: str | None) -> None:
    """Put weights, optimizer, scheduler and RNG states back as they were when `ck` was saved."""
    net.load_state_dict(ck["model"])
    optimizer.load_state_dict(ck["optimizer"])
    if scheduler is not None and ck["scheduler"] is not None:
        scheduler.load_state_dict(ck["scheduler"])
    set_rng_state(ck["rng"])
    if ck.get("feature_id") != feature_id:
        log(
            "warning: the features computed now differ from those of the interrupted run "
            "(other machine, thread count or library version?); the resumed run continues but "
            "will not be bit-identical to an uninterrupted one."
        )


def interrupted(signame: str, out: Path, epoch: int, batches: int, per_epoch: int) -> RunInterrupted:
    """The clean-stop error: where the run stopped and the command that continues it."""
    return RunInterrupted(
        f"{signame} received: stopped at epoch {epoch}, batch {batches}/{per_epoch}, after saving "
        f"{str(out / CHECKPOINT)!r}. Continue with: headstart train --resume {out}"
    )


def never_loaded_failures(sampler: ResumableSampler, batch_size: int, epochs: int, items: list) -> dict:
    """Files that drop_last left out of every epoch are read once here, so none is silently unchecked."""
    n = len(items)
    tail = n - n % batch_size
    unseen = set(range(n))
    for order in sampler.orders(epochs):
        unseen &= set(order[tail:])
    failures = {}
    for i in sorted(unseen):
        try:
            load_image(items[i][0], draft=64)
        except Exception as e:  # noqa: BLE001 - reported like any other unreadable file
            failures[items[i][0]] = explain_failure(items[i][0], e)
    return failures


def check_bad_fraction(bad: list[Skipped], split: DataSplit, limit: float, *, so_far: bool = False) -> None:
    """Stop with a pointer to `headstart doctor` when too many files of a split fail to load."""
    total = len(split.train) + len(split.val)
    if bad and len(bad) > limit * total:
        shown = "; ".join(f"{s.path} ({s.reason})" for s in bad[:5])
        raise DataError(
            f"{'Already ' if so_far else ''}{len(bad)} of {total} images could not be loaded "
            f"(limit {limit:.0%}, "
            f"--max-bad-fraction): {shown}{' …' if len(bad) > 5 else ''}. Run `headstart doctor "
            f"{split_root(split)}` to list every problem, and --quarantine to move them aside."
        )


def split_root(split: DataSplit) -> str:
    """A folder to point the doctor at."""
    import os

    paths = [p for p, _ in split.train[:1] + split.val[:1]]
    return os.path.commonpath(paths) if paths else "DATA"


def class_weight_tensor(split: DataSplit, mode: str) -> torch.Tensor | None:
    """'balanced' weights n / (k * count_c), as scikit-learn computes them."""
    if mode == "none":
        return None
    counts = np.array(list(split.counts("train").values()), dtype=np.float64)
    w = counts.sum() / (len(counts) * np.maximum(counts, 1))
    return torch.tensor(w, dtype=torch.float32)


def build_optimizer(model: TransferModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Only trainable tensors; the backbone's at lr * backbone_lr_mult, no decay on norms/biases."""
    groups = []
    for part, lr in ((model.head, cfg.lr), (model.backbone, cfg.lr * cfg.backbone_lr_mult)):
        decay, no_decay = [], []
        for p in part.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        if decay:
            groups.append({"params": decay, "lr": lr, "weight_decay": cfg.weight_decay})
        if no_decay:
            groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
    if cfg.strategy == "scratch":
        for g in groups:  # from scratch, the backbone is not "pretrained": one learning rate
            g["lr"] = cfg.lr
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def build_scheduler(optimizer, cfg: TrainConfig, *, steps_per_epoch: int):
    """Per-step cosine decay to 0, step decay (×0.1 every step_size epochs), or constant."""
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
        )
    if cfg.schedule == "step":
        every = (cfg.step_size or max(1, cfg.epochs // 3)) * max(1, steps_per_epoch)
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=every, gamma=0.1)
    return None


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the tensors that can change: trainable params and non-frozen BN buffers."""
    from headstart.freezing import frozen_tensor_names

    _, names = frozen_tensor_names(model)
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    return {n: tensors[n].detach().clone() for n in names}


def preprocess_of(backbone, image_size: int | None = None) -> Preprocess:
    """The eval preprocessing a backbone expects, optionally at another input size."""
    c = backbone.config
    if image_size is not None and image_size < 32:
        raise ConfigError(f"--image-size {image_size} is too small; use 32 or more.")
    return Preprocess(image_size or c.input_size, c.mean, c.std, c.interpolation, c.crop_pct)


def prepare_output(output: str, *, overwrite: bool, resume: bool = False) -> Path:
    """Create the run folder; refuse to mix a new run into a finished or unfinished one unless asked."""
    out = Path(output)
    if resume:
        if (out / RESULTS).exists():
            raise ConfigError(f"{str(out)!r} holds a finished run: there is nothing to resume.")
        if not (out / CONFIG).exists():
            raise ConfigError(f"{str(out)!r} is not a headstart run folder (no {CONFIG}); nothing to resume.")
        return out
    if (out / RESULTS).exists() and not overwrite:
        raise ConfigError(
            f"{str(out)!r} already holds a finished run. Pass --overwrite to replace it, or "
            "choose another --output."
        )
    if (out / CHECKPOINT).exists():
        if not overwrite:
            raise ConfigError(
                f"{str(out)!r} holds an unfinished run (checkpoint.pt). Continue it with "
                f"`headstart train --resume {out}`, or pass --overwrite to start again."
            )
        (out / CHECKPOINT).unlink()  # a stale checkpoint must never be resumed into a new run
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_config(cfg: TrainConfig, device: torch.device) -> dict:
    """config.json: resolved options plus versions and machine, enough to reproduce the run."""
    import timm
    import torchvision

    return {
        "options": cfg.to_dict(),
        "versions": {
            "headstart": __version__,
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "timm": timm.__version__,
            "numpy": np.__version__,
        },
        "device": str(device),
        "platform": platform.platform(),
        "seed": cfg.seed,
    }


def log(msg: str) -> None:
    """One clean line per event on stderr (progress bars only when it is a terminal); rank 0 only."""
    if os.environ.get("RANK", "0") == "0":
        tqdm.write(msg, file=sys.stderr)
