"""Run setup: everything a strategy needs before it trains, built in one place.

seed -> device (and torchrun processes) -> run folder and config.json -> data split -> backbone
(pretrained unless the strategy says otherwise) + new head -> freezing -> frozen proof -> loss.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from headstart import __version__
from headstart.core import logs
from headstart.core.device import configure_threads, pick_device
from headstart.core.distributed import DistInfo, barrier, init_distributed
from headstart.core.errors import DataError
from headstart.core.files import PLAN, SPLIT, read_json, write_json
from headstart.core.metrics import balanced_class_weights
from headstart.data.layout import DataSplit, Skipped, resolve_data
from headstart.data.transforms import Preprocess
from headstart.models.backbones import Backbone, create_backbone, with_feature_blocks
from headstart.models.freezing import FrozenProof, count_params
from headstart.models.heads import HeadSpec, make_loss
from headstart.models.transfer import TransferModel
from headstart.training.options import TrainConfig
from headstart.training.rundir import prepare_output, write_run_config
from headstart.training.strategies.base import Strategy


@dataclass
class Run:
    """One training run in progress: its options, place, data and model."""

    cfg: TrainConfig
    strategy: Strategy
    out: Path
    device: torch.device
    dist: DistInfo
    split: DataSplit
    model: TransferModel
    head_spec: HeadSpec
    preprocess: Preprocess
    proof: FrozenProof
    unfrozen: list[str]
    trainable_params: int
    frozen_params: int
    loss_fn: nn.Module
    resume: bool = False
    started: float = field(default_factory=time.perf_counter)
    skipped: list[Skipped] = field(default_factory=list)  # files left out so far, with reasons
    plan: dict | None = None  # --strategy auto: how this recipe was chosen (plan.json)
    deadline: float | None = None  # time.monotonic() by which training must stop (auto's budget)
    most_epochs: int | None = None  # under a deadline, the epochs training may stretch to where time allows
    out_of_time: bool = False  # the deadline ended training early (the best epoch so far was kept)

    @property
    def backbone(self) -> Backbone:
        """The model's backbone."""
        return self.model.backbone


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def backbone_for(cfg: TrainConfig, *, pretrained: bool = True) -> Backbone:
    """The run's backbone: cfg.backbone with its weights (random if not `pretrained`), pooling
    cfg.feature_blocks blocks."""
    backbone = create_backbone(cfg.backbone, weights=cfg.weights if pretrained else "none")
    return with_feature_blocks(backbone, cfg.feature_blocks) if cfg.feature_blocks > 1 else backbone


def build_model(
    cfg: TrainConfig, strategy: Strategy, classes: list[str]
) -> tuple[TransferModel, HeadSpec, list[str]]:
    """The run's model as it starts training: backbone, new head, the strategy's freezing; with the
    head spec and the unfrozen module names."""
    backbone = backbone_for(cfg, pretrained=strategy.pretrained)
    head_spec = HeadSpec.parse(cfg.head, dropout=cfg.dropout)
    model = TransferModel.build(backbone, head_spec, classes)
    model.tta = cfg.tta
    return model, head_spec, strategy.freeze(model, cfg)


def preprocess_of(backbone: Backbone, image_size: int | None = None) -> Preprocess:
    """The eval preprocessing a backbone expects, optionally at another input size."""
    c = backbone.config
    return Preprocess(image_size or c.input_size, c.mean, c.std, c.interpolation, c.crop_pct)


def setup_run(
    cfg: TrainConfig,
    strategy: Strategy,
    *,
    resume: bool = False,
    split: DataSplit | None = None,
    plan: dict | None = None,
    deadline: float | None = None,
    most_epochs: int | None = None,
) -> Run:
    """Everything before training, for a resolved config; writes config.json and split.json (and
    auto's plan.json). `split` replaces the data folder's own split; `deadline` (time.monotonic)
    is when training must stop, keeping the best epoch so far, and `most_epochs` how many epochs it
    may train where the deadline leaves time for more than planned."""
    started = time.perf_counter()
    device = pick_device(cfg.device)
    dist = init_distributed(device.type)  # torchrun: one process per device, rank 0 writes
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    out = (
        prepare_output(cfg.output, overwrite=cfg.overwrite, resume=resume)
        if dist.is_main
        else Path(cfg.output)
    )
    barrier(dist)
    seed_everything(cfg.seed)
    threads = configure_threads()
    if dist.is_main and not resume:
        write_run_config(out, cfg.to_dict(), device)  # --resume reads the options back

    split, plan = _split_and_plan(cfg, out, dist, resume, split, plan)

    # model: backbone, new head, freezing, then the proof of what must not change
    model, head_spec, unfrozen = build_model(cfg, strategy, split.classes)
    backbone = model.backbone
    trainable, frozen = count_params(model)
    proof = FrozenProof.take(model)
    model.to(device, memory_format=torch.channels_last)  # NHWC kernels: faster on CPU and GPU
    counts = list(split.counts("train").values())
    weights = (
        torch.tensor(balanced_class_weights(counts), dtype=torch.float32)
        if cfg.class_weights == "balanced"
        else None
    )
    loss_fn = make_loss(head_spec.kind, label_smoothing=cfg.label_smoothing, class_weights=weights).to(device)
    logs.info(
        f"headstart {__version__}: {cfg.strategy} on {backbone.config.name} "
        f"({trainable:,} trainable / {frozen:,} frozen params), "
        f"head {head_spec.describe(backbone.feature_dim, len(split.classes))}, "
        f"{len(split.train)} train / {len(split.val)} val images, {len(split.classes)} classes, "
        f"device {device}, {threads} threads" + (f", {dist.world} processes" if dist.enabled else "")
    )
    r = Run(
        cfg,
        strategy,
        out,
        device,
        dist,
        split,
        model,
        head_spec,
        preprocess_of(backbone, cfg.image_size),
        proof,
        unfrozen,
        trainable,
        frozen,
        loss_fn,
        resume,
        started,
        list(split.skipped),
    )
    r.plan, r.deadline, r.most_epochs = plan, deadline, most_epochs
    return r


def check_bad_fraction(bad: list[Skipped], split: DataSplit, limit: float, *, so_far: bool = False) -> None:
    """Stop with a pointer to `headstart doctor` when too many files of a split fail to load."""
    total = len(split.train) + len(split.val)
    if bad and len(bad) > limit * total:
        shown = "; ".join(f"{s.path} ({s.reason})" for s in bad[:5])
        raise DataError(
            f"{'Already ' if so_far else ''}{len(bad)} of {total} images could not be loaded "
            f"(limit {limit:.0%}, --max-bad-fraction): {shown}{' …' if len(bad) > 5 else ''}. Run "
            f"`headstart doctor {split_root(split)}` to list every problem, and --quarantine to move them "
            "aside."
        )


def split_root(split: DataSplit) -> str:
    """The folder to point the doctor at: the dataset root (older split.json: the items' common folder)."""
    import os

    if split.root:
        return split.root
    paths = [p for p, _ in split.train[:1] + split.val[:1]]
    return os.path.commonpath(paths) if paths else "DATA"


def _split_and_plan(cfg: TrainConfig, out: Path, dist: DistInfo, resume: bool, split: DataSplit | None,
                    plan: dict | None) -> tuple[DataSplit, dict | None]:  # fmt: skip
    """The run's split (a resumed run reuses the exact file lists it started with) and auto's plan,
    written to split.json and plan.json (or read back from them on --resume)."""
    if resume and (out / SPLIT).is_file():
        split = DataSplit.from_dict(read_json(out / SPLIT))
    else:
        split = split or resolve_data(cfg.data, val=cfg.val, val_fraction=cfg.val_fraction, seed=cfg.seed)
        if dist.is_main:
            write_json(out / SPLIT, split.to_dict())
    if resume and (out / PLAN).is_file():
        plan = read_json(out / PLAN)
    elif plan is not None and dist.is_main:
        write_json(out / PLAN, plan)
    return split, plan
