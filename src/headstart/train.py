"""The training loop: read it top to bottom.

setup (seed, device, data, backbone, head, freezing, frozen proof)
-> [extract: run the frozen backbone once and train the head on its features]
-> per epoch: train, validate, log a metrics.csv row, keep the best weights, stop early if asked
-> verify the frozen proof -> save model.safetensors, model.json, results.json.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler, Subset
from tqdm.auto import tqdm

from headstart import __version__
from headstart.backbones import DEFAULT_BACKBONE, create_backbone
from headstart.cache import FeatureCache, default_cache_dir, model_key, weights_checksum
from headstart.data import (
    Augment,
    Batch,
    DataSplit,
    ImageDataset,
    Preprocess,
    Skipped,
    eval_transform,
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
from headstart.errors import ConfigError, DataError, TrainingDiverged
from headstart.features import Features, extract_features
from headstart.freezing import (
    STRATEGIES,
    FrozenProof,
    apply_strategy,
    compact_names,
    count_params,
)
from headstart.heads import HeadSpec, make_loss
from headstart.model import TransferModel
from headstart.runs import CONFIG, METRICS, RESULTS, SPLIT, save_model, write_json

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
    cache_dir: str | None = None
    cache: bool = True
    classifier: str = "logistic"
    image_size: int | None = None

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
        ):
            if not ok:
                raise ConfigError(f"--{name.replace('_', '-')} has an invalid value: {getattr(c, name)}.")
        if c.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"--optimizer {c.optimizer!r}: use adamw or sgd.")
        if c.schedule not in ("cosine", "step", "none"):
            raise ConfigError(f"--schedule {c.schedule!r}: use cosine, step or none.")
        if c.class_weights not in ("none", "balanced"):
            raise ConfigError(f"--class-weights {c.class_weights!r}: use none or balanced.")
        return c

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        d = dataclasses.asdict(self)
        d["unfreeze_patterns"] = list(self.unfreeze_patterns)
        return d


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


def run_training(cfg: TrainConfig) -> TrainResult:
    """Train from a TrainConfig; the body of `train`."""
    cfg = cfg.resolved()
    if cfg.strategy == "linear-probe":
        from headstart.probe import run_linear_probe

        return run_linear_probe(cfg)
    t_start = time.perf_counter()
    device = pick_device(cfg.device)
    dist = init_distributed(device.type)  # torchrun: one process per device, rank 0 writes
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    out = prepare_output(cfg.output, overwrite=cfg.overwrite) if dist.is_main else Path(cfg.output)
    barrier(dist)
    seed_everything(cfg.seed)
    threads = configure_threads()

    # --- data
    split = resolve_data(cfg.data, val=cfg.val, val_fraction=cfg.val_fraction, seed=cfg.seed)
    if dist.is_main:
        write_json(out / SPLIT, split.to_dict())

    # --- model: backbone (pretrained unless scratch), new head, freezing, frozen proof
    weights = "none" if cfg.strategy == "scratch" else cfg.weights
    backbone = create_backbone(cfg.backbone, weights=weights)
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
    if cfg.strategy == "extract":
        net: nn.Module = model.head
        train_ds, val_ds, bad, timings["extract_seconds"], feature_stats = feature_datasets(
            backbone, split, pp, cfg, device, dist
        )
        check_bad_fraction(bad, split, cfg.max_bad_fraction)
        skipped += bad
        workers = 0
    else:
        net = model
        draft = pp.resize_size
        train_ds = ImageDataset(split.train, train_transform(pp, cfg.augment), draft=draft)
        val_ds = ImageDataset(split.val, eval_transform(pp), draft=draft)
        workers = cfg.num_workers
    pin = device.type == "cuda"
    # Each rank trains on its DistributedSampler share (--batch-size is per process) and
    # validates a strided share of val; sums are all-reduced, so metrics cover every image once.
    sampler = DistributedSampler(train_ds, seed=cfg.seed) if dist.enabled else None
    per_rank = len(train_ds) // dist.world
    train_loader = make_loader(
        train_ds, batch_size=cfg.batch_size, shuffle=sampler is None, sampler=sampler,
        num_workers=workers, seed=cfg.seed, pin_memory=pin, drop_last=per_rank > cfg.batch_size,
    )  # fmt: skip
    val_loader = make_loader(
        Subset(val_ds, shard(list(range(len(val_ds))), dist)), batch_size=max(cfg.batch_size, 64),
        shuffle=False, num_workers=workers, pin_memory=pin,
    )  # fmt: skip
    if dist.enabled:
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch=len(train_loader))

    # --- the loop
    metrics: list[dict] = []
    best = {"val_acc": -1.0, "val_loss": math.inf, "epoch": 0, "state": None}
    bad_files: dict[str, str] = {}
    t_train = time.perf_counter()
    with open(out / METRICS if dist.is_main else os.devnull, "w", newline="") as fcsv:
        writer = csv.DictWriter(
            fcsv, ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]
        )
        writer.writeheader()
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.perf_counter()
            lr_now = optimizer.param_groups[0]["lr"]
            if sampler is not None:
                sampler.set_epoch(epoch)
            tr = run_epoch(net, train_loader, loss_fn, device, head_spec.kind,
                           optimizer=optimizer, scheduler=scheduler, items=split.train,
                           bad_files=bad_files, desc=f"epoch {epoch}/{cfg.epochs}", dist=dist)  # fmt: skip
            va = run_epoch(net, val_loader, loss_fn, device, head_spec.kind,
                           items=split.val, bad_files=bad_files, desc="val", dist=dist)  # fmt: skip
            if epoch == 1 and cfg.strategy != "extract":
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
            if cfg.patience and epoch - best["epoch"] >= cfg.patience:
                log(f"early stop: no val improvement for {cfg.patience} epochs")
                break
    timings["head_train_seconds" if cfg.strategy == "extract" else "train_loop_seconds"] = (
        time.perf_counter() - t_train
    )

    # --- best weights back, prove the frozen part stayed frozen, save
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
        **(feature_stats if cfg.strategy == "extract" else {}),
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
    }
    if dist.enabled:
        results["world_size"] = dist.world
    if dist.is_main:
        write_json(out / RESULTS, results)
        write_json(out / CONFIG, run_config(cfg, device) | {"world_size": dist.world})
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
    dist: DistInfo = DistInfo(),
) -> dict:
    """One pass over `loader`; trains when an optimizer is given. Returns mean loss and accuracy."""
    training = optimizer is not None
    net.train(training)
    total_loss, correct, seen = 0.0, 0, 0
    grad = torch.enable_grad() if training else torch.inference_mode()
    bar = tqdm(loader, desc=desc, leave=False, disable=None if dist.is_main else True, unit="batch")
    with grad:
        for batch in bar:
            batch: Batch
            if bad_files is not None and items is not None:
                bad_files.update({items[i][0]: why for i, why in batch.failed})
            if batch.x is None:
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
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
            n = y.numel()
            total_loss += loss.item() * n
            correct += (predict_labels(logits, head_kind) == y).sum().item()
            seen += n
            bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}")
    bar.close()
    total_loss, correct, seen = all_sum([total_loss, correct, seen], dist, device)
    return {"loss": total_loss / max(seen, 1), "acc": correct / max(seen, 1), "n": int(seen)}


def predict_labels(logits: torch.Tensor, head_kind: str) -> torch.Tensor:
    """Predicted class indices from head outputs."""
    if head_kind == "binary":
        return (logits.reshape(-1) > 0).long()
    return logits.argmax(dim=1)


# ----------------------------------------------------------------------------- setup helpers


class _FeatureDataset(Dataset):
    """Cached features served in the same (x, label, index, error) form as images."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor):
        self.x, self.y, self.index = x, y, index

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i].float(), int(self.y[i]), int(self.index[i]), None


def open_cache(cfg: TrainConfig, backbone, pp: Preprocess, views: str = "eval") -> FeatureCache | None:
    """The feature cache for this backbone's exact weights and preprocessing (None if disabled)."""
    if not cfg.cache:
        return None
    spec = {
        "backbone": backbone.config.name,
        "arch": backbone.config.arch,
        "weights": weights_checksum(backbone),
        "preprocess": pp.to_dict(),
        "views": views,
    }
    root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    return FeatureCache(root, model_key(spec), spec)


def feature_datasets(backbone, split: DataSplit, pp: Preprocess, cfg: TrainConfig, device, dist):
    """Features of train and val (un-augmented views), from the cache or computed once.

    Ranks of a torchrun job each extract a strided share, then gather. Returns the two datasets,
    the files that failed, the seconds spent and cache statistics for results.json.
    """
    tf = eval_transform(pp)
    cache = open_cache(cfg, backbone, pp)
    kw = dict(device=device, batch_size=64, num_workers=cfg.num_workers, draft=pp.resize_size, cache=cache)
    ftr = gather_features(
        extract_features(
            backbone,
            split.train,
            tf,
            desc="features train",
            subset=shard(range(len(split.train)), dist),
            **kw,
        ),
        dist,
    )
    fva = gather_features(
        extract_features(
            backbone, split.val, tf, desc="features val", subset=shard(range(len(split.val)), dist), **kw
        ),
        dist,
    )
    secs = ftr.seconds + fva.seconds
    n = len(ftr.y) + len(fva.y)
    hits, misses = ftr.hits + fva.hits, ftr.misses + fva.misses
    hit_rate = hits / max(hits + misses, 1)
    where = f"cache {cache.dir}" if cache is not None else "no cache"
    log(
        f"features: {n} images in {secs:.1f}s, {misses} extracted "
        f"({misses / max(secs, 1e-9):.1f} img/s), {hits} from {where} (hit rate {hit_rate:.0%})"
    )
    if cache is not None:
        cache.close()
    # The feature datasets keep item indices, so failures and NaN reports still name files.
    return (
        _FeatureDataset(ftr.x, ftr.y, ftr.index),
        _FeatureDataset(fva.x, fva.y, fva.index),
        ftr.failed + fva.failed,
        secs,
        {"cache_hit_rate": round(hit_rate, 6), "features_extracted": misses, "features_from_cache": hits},
    )


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


def check_bad_fraction(bad: list[Skipped], split: DataSplit, limit: float) -> None:
    """Stop with a pointer to `headstart doctor` when too many files of a split fail to load."""
    total = len(split.train) + len(split.val)
    if bad and len(bad) > limit * total:
        shown = "; ".join(f"{s.path} ({s.reason})" for s in bad[:5])
        raise DataError(
            f"{len(bad)} of {total} images could not be loaded (limit {limit:.0%}, "
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


def prepare_output(output: str, *, overwrite: bool) -> Path:
    """Create the run folder; refuse to mix a new run into a finished one unless asked."""
    out = Path(output)
    if (out / RESULTS).exists() and not overwrite:
        raise ConfigError(
            f"{str(out)!r} already holds a finished run. Pass --overwrite to replace it, or "
            "choose another --output."
        )
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
