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


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, *, steps_per_epoch: int):
    """Per-step cosine decay to 0, step decay (x0.1 every step_size epochs), or constant (None)."""
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
        )
    if cfg.schedule == "step":
        every = (cfg.step_size or max(1, cfg.epochs // 3)) * max(1, steps_per_epoch)
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=every, gamma=0.1)
    return None
