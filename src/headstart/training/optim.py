"""Optimizer and learning-rate schedule: only trainable tensors, the backbone at a smaller rate."""

from __future__ import annotations

import math

import torch

from headstart.models.transfer import TransferModel
from headstart.training.options import TrainConfig


def build_optimizer(model: TransferModel, cfg: TrainConfig, *, one_lr: bool = False) -> torch.optim.Optimizer:
    """Trainable tensors only; the backbone's at lr * backbone_lr_mult (lr if `one_lr`), no decay on
    norms and biases."""
    groups = []
    backbone_lr = cfg.lr if one_lr else cfg.lr * cfg.backbone_lr_mult
    for part, lr in ((model.head, cfg.lr), (model.backbone, backbone_lr)):
        decay, no_decay = [], []
        for p in part.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        if decay:
            groups.append({"params": decay, "lr": lr, "weight_decay": cfg.weight_decay})
        if no_decay:
            groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr)


class Cosine:
    """Per-step cosine decay to 0 by the end of `epochs`. `reschedule` moves that end (a budget's
    deadline) and the decay continues from the current value, without a jump. A callable object,
    so the scheduler's state_dict (and a resumed run) keeps where it was moved."""

    def __init__(self, epochs: float, steps_per_epoch: int):
        self.epochs, self.steps_per_epoch = epochs, max(1, steps_per_epoch)
        self.from_step, self.from_value = 0, 1.0  # where the current decay began

    def __call__(self, step: int) -> float:
        span = max(1, self.epochs * self.steps_per_epoch - self.from_step)
        done = min(max(0, step - self.from_step), span) / span
        return self.from_value * 0.5 * (1 + math.cos(math.pi * done))


def reschedule(scheduler, epochs: float) -> None:
    """Make a cosine schedule decay from where it stands to 0 by the end of `epochs` (fewer or more
    than planned); other schedules are left as they are."""
    step = getattr(scheduler, "last_epoch", 0)
    for f in getattr(scheduler, "lr_lambdas", ()):
        if isinstance(f, Cosine):
            f.from_value, f.from_step, f.epochs = f(step), step, epochs


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, *, steps_per_epoch: int):
    """Per-step cosine decay to 0, step decay (x0.1 every step_size epochs), or constant (None)."""
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, Cosine(cfg.epochs, steps_per_epoch))
    if cfg.schedule == "step":
        every = (cfg.step_size or max(1, cfg.epochs // 3)) * max(1, steps_per_epoch)
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=every, gamma=0.1)
    return None
