"""The strategy plug-in interface and its registry.

A strategy decides what trains (`freeze`), what the loop is fed (`inputs`: features, cached
prefix maps or images) and how it is fitted (`fit`: the training loop, or a closed-form fit).
Each lives in its own module of this package and is registered by one line in its __init__.py.
`run` below is a headstart.training.setup.Run (not imported here: setup is built on this module).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from headstart.core.errors import ConfigError, did_you_mean
from headstart.data.layout import Skipped

REGISTRY: dict[str, Strategy] = {}


@dataclass
class Inputs:
    """What the loop trains on: the module that trains and (x, label, index, error) datasets."""

    net: nn.Module  # the head (features), the suffix + head (prefix maps) or the whole model (images)
    train: Dataset
    val: Dataset
    workers: int | None  # DataLoader processes: 0 when samples are already in memory
    decodes_images: bool  # images are decoded every epoch, so files can fail mid-run
    failed: list[Skipped] = field(default_factory=list)  # files that failed while preparing
    seconds: float = 0.0  # time spent preparing (feature or prefix extraction)
    stats: dict = field(default_factory=dict)  # cache figures for results.json
    identity: str | None = None  # identity of precomputed inputs, checked on --resume


@dataclass
class Fitted:
    """What fitting produced: per-epoch metrics and the best weights (by validation accuracy)."""

    metrics: list[dict]
    best_epoch: int
    val_acc: float
    val_loss: float
    best_state: dict | None  # tensors to load back (None: keep the model as it is)
    seconds: float
    bad_files: dict[str, str] = field(default_factory=dict)  # files that failed during the epochs
    resumes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # strategy-specific results.json entries
    val_confusion: list[list[int]] | None = None  # of the kept weights; rows true, columns predicted
    epochs_trained: float | None = None  # a last epoch the budget cut short counts as its share


class Strategy(ABC):
    """One way to train: a registered plug-in."""

    name: str
    variant: tuple[str, str] | None = None  # (strategy, boolean option) that selects this plug-in instead
    default_epochs: int
    default_lr: float
    pretrained: bool = True  # False: the backbone starts from random weights
    one_lr: bool = False  # True: the backbone trains at the head's learning rate
    seconds_key: str = "train_loop_seconds"  # results.json name of the fitting time
    # what it computes once per image with the frozen backbone: "features", prefix "maps", or None
    # (auto's shared pass computes these for several pilots at once: training/auto/shared_pass.py)
    frozen_outputs: str | None = None

    @abstractmethod
    def freeze(self, model: nn.Module, cfg) -> list[str]:
        """Set requires_grad for this strategy; returns the unfrozen backbone module names."""

    @abstractmethod
    def inputs(self, run) -> Inputs:
        """Prepare what the fit reads (features, cached maps or images)."""

    @abstractmethod
    def fit(self, run, inputs: Inputs) -> Fitted:
        """Train; the best weights are returned, not yet loaded."""


def register(strategy: Strategy) -> Strategy:
    """Add a plug-in to the registry under its name."""
    REGISTRY[strategy.name] = strategy
    return strategy


def public_names() -> list[str]:
    """Values of --strategy (variants are selected by their option instead)."""
    return [name for name, s in REGISTRY.items() if s.variant is None]


def get_strategy(name: str) -> Strategy:
    """A registered strategy by --strategy name; ConfigError naming the valid ones."""
    if name not in REGISTRY or REGISTRY[name].variant is not None:
        names = public_names()
        raise ConfigError(
            f"Unknown strategy {name!r}; use one of {', '.join(names)}." + did_you_mean(name, names)
        )
    return REGISTRY[name]


def select(cfg) -> Strategy:
    """The plug-in for a config: a variant whose option is on (finetune + --cache-prefix), else --strategy."""
    for s in REGISTRY.values():
        if s.variant is not None and s.variant[0] == cfg.strategy and getattr(cfg, s.variant[1]):
            return s
    return get_strategy(cfg.strategy)
