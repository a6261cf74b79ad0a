"""TrainConfig: every training option, declared once.

Each field carries its type, default, help, choices, bounds and CLI group (`core.options.option`);
the `train` and `compare` parsers are generated from these fields, `resolved()` is where every
option is checked, and config.json / `--config FILE` (YAML or JSON) round-trip through `from_dict`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from headstart.core.errors import ConfigError, did_you_mean
from headstart.core.options import checked, option
from headstart.data.transforms import Augment
from headstart.features.views import FeatureOptions
from headstart.models.config import DEFAULT_BACKBONE
from headstart.models.heads import HeadSpec
from headstart.models.tta import TTA_CHOICES
from headstart.training.auto.budget import parse_duration
from headstart.training.strategies.base import get_strategy, public_names

OPT, RUN, AUG = "optimisation", "run", "augmentation (training images)"


@dataclass
class TrainConfig:
    """Every option of a run; saved to config.json so the run can be reproduced."""

    data: str | None = option(
        None, help="folder with train/ and val/ class subfolders, or one class tree", flag="data"
    )
    output: str | None = option(None, help="run folder (default: runs/NAME-STRATEGY)", short="-o")
    val: str | None = option(None, help="separate validation folder of class subfolders")
    val_fraction: float = option(
        0.2, help="validation share when DATA is one class tree (stratified, seeded)", above=0, below=1
    )
    backbone: str = option(
        DEFAULT_BACKBONE,
        short="-b",
        help="efficientnet_lite0/1/2 (embedded), tv:NAME, timm:NAME, hf:ORG/REPO "
        "(`headstart backbones` lists them)",
    )
    weights: str | None = option(None, help="weights FILE (.safetensors/.pth), or 'none' for random init")
    strategy: str = option(
        "auto",
        short="-s",
        choices=public_names,
        help="auto: measure, search and train the best recipe within --budget (docs/auto.md); extract: "
        "frozen backbone, train the head; linear-probe: logistic regression on the features; finetune: "
        "the last --unfreeze block groups train too; full: everything trains; scratch: random init",
    )
    unfreeze: int = option(2, help="finetune: number of last block groups to train", min=0)
    unfreeze_patterns: tuple[str, ...] = option(
        (),
        flag="--unfreeze-pattern",
        metavar="REGEX",
        help="finetune: also train modules whose name matches this regex (repeatable)",
    )
    head: str = option("linear", help="linear | binary | mlp:H1,H2 (e.g. mlp:512,256)")
    dropout: float = option(0.0, help="dropout before head layers", min=0, below=1)
    image_size: int | None = option(
        None, min=32, help="input size instead of the backbone's (smaller is faster, e.g. for 32 px images)"
    )
    feature_blocks: int = option(
        1,
        metavar="K",
        min=1,
        help="features = average-pooled outputs of the last K block groups, "
        "concatenated (default 1: the usual pooled features; earlier blocks "
        "can transfer better to unlike domains)",
    )
    classifier: str = option(
        "logistic",
        choices=("logistic", "svm"),
        help="linear-probe: logistic regression or linear SVM (C by cross-validation)",
    )
    # optimisation
    epochs: int | None = option(
        None, group=OPT, min=1, help="default by strategy: extract 30, finetune 8, full 8, scratch 15"
    )
    batch_size: int = option(32, group=OPT, min=1, help="images per training step (per process)")
    lr: float | None = option(
        None,
        group=OPT,
        above=0,
        help="head learning rate (default by strategy: 1e-3; full 3e-4; scratch 3e-3)",
    )
    backbone_lr_mult: float = option(0.1, group=OPT, min=0, help="backbone lr = lr x this when fine-tuning")
    weight_decay: float = option(1e-4, group=OPT, min=0, help="AdamW/SGD weight decay (not on norms/biases)")
    optimizer: str = option("adamw", group=OPT, choices=("adamw", "sgd"), help="optimizer")
    momentum: float = option(0.9, group=OPT, min=0, below=1, help="SGD momentum")
    schedule: str = option(
        "cosine", group=OPT, choices=("cosine", "step", "none"), help="learning-rate decay"
    )
    step_size: int | None = option(None, group=OPT, min=1, help="epochs per x0.1 for --schedule step")
    label_smoothing: float = option(0.0, group=OPT, min=0, below=1, help="label smoothing of the loss")
    class_weights: str = option(
        "none",
        group=OPT,
        choices=("none", "balanced"),
        help="balanced: weight the loss by inverse class frequency",
    )
    patience: int | None = option(
        None, group=OPT, min=1, help="early stop after this many epochs without val improvement"
    )
    keep_epoch: str = option(
        "best",
        group=OPT,
        choices=("best", "last"),
        help="the model: the epoch with the best val accuracy (balanced accuracy with --class-weights "
        "balanced; that number is then a little optimistic), or the last epoch (nothing is chosen on the "
        "validation split; auto's final run)",
    )
    budget: str = option(
        "10m",
        group=OPT,
        metavar="DURATION",
        help="--strategy auto: the time to spend, searching and training together (90s, 10m, 1h, 1h30m)",
    )
    augment: Augment = option(help="training augmentations", group=AUG, default_factory=Augment)
    # run
    seed: int = option(0, group=RUN, help="seed of the split, the shuffles, augmentation and init")
    device: str = option("auto", group=RUN, help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps")
    num_workers: int | None = option(
        None, group=RUN, flag="--workers", min=0, help="DataLoader processes (default: cores-1)"
    )
    max_bad_fraction: float = option(
        0.05, group=RUN, min=0, max=1, help="stop if more than this share of images cannot be read"
    )
    overwrite: bool = option(False, group=RUN, help="replace a finished run in --output")
    checkpoint_every: int | None = option(
        None,
        group=RUN,
        metavar="N",
        min=1,
        help="also checkpoint every N training steps (always: after every epoch)",
    )
    deterministic: bool = option(False, group=RUN, help="torch.use_deterministic_algorithms(True)")
    cache_dir: str | None = option(
        None, group=RUN, help="feature cache (default: $HEADSTART_CACHE or the user cache folder)"
    )
    cache: bool = option(True, group=RUN, flag="--no-cache", help="compute features without the disk cache")
    cache_views: int = option(
        1,
        group=RUN,
        metavar="K",
        min=1,
        help="extract, linear-probe, --cache-prefix: cache K views per training image, the eval "
        "view + K-1 augmented (default 1; see docs/speed.md)",
    )
    compile: bool = option(False, group=RUN, help="torch.compile the frozen backbone (opt-in)")
    frozen_engine: str = option(
        "auto",
        group=RUN,
        choices=("auto", "torch", "onnxruntime"),
        help="what computes frozen features and cached prefix maps: auto (ONNX Runtime on a CPU "
        "where installed, for 1000+ images or a frozen part exported before, if it matches PyTorch on "
        "the first batch; else PyTorch), torch, onnxruntime",
    )
    cache_prefix: bool = option(
        False,
        group=RUN,
        help="finetune: cache the frozen blocks' activations once, train only the rest (flips only)",
    )
    calibrate: bool = option(False, group=RUN, help="fit a temperature on the val split after training")
    tta: str = option(
        "none",
        group=RUN,
        choices=TTA_CHOICES,
        help="test-time augmentation: hflip averages the logits of each image and its mirror, in "
        "validation, predict and export (2 forward passes; fine-tuning strategies; auto's fine-tuning "
        "recipes use it)",
    )

    # ------------------------------------------------------------------------- checks

    def resolved(self) -> TrainConfig:
        """Fill defaults that depend on other options and check every value; raises ConfigError."""
        c = checked(dataclasses.replace(self, augment=checked(self.augment)))
        if not c.data:
            raise ConfigError("headstart train needs DATA (a folder of class subfolders), or --resume RUN.")
        c.data = str(c.data)
        if not c.output:
            c.output = os.path.join("runs", f"{os.path.basename(os.path.normpath(c.data))}-{c.strategy}")
        c.output = str(c.output)
        strategy = get_strategy(c.strategy)
        c.epochs = c.epochs if c.epochs is not None else strategy.default_epochs
        c.lr = c.lr if c.lr is not None else strategy.default_lr
        HeadSpec.parse(c.head, dropout=c.dropout)  # a malformed --head fails here, before any work
        parse_duration(c.budget)
        _cross_checks(c)
        return c

    # ------------------------------------------------------------------------- views

    def feature_options(self) -> FeatureOptions:
        """How features (or cached prefix maps) are computed and kept."""
        return FeatureOptions(
            cache=self.cache,
            cache_dir=self.cache_dir,
            num_workers=self.num_workers,
            views=self.cache_views,
            augment=self.augment,
            seed=self.seed,
            compile=self.compile,
            engine=self.frozen_engine,
            tta=self.tta,
        )

    def to_dict(self) -> dict:
        """Plain-JSON form (the "options" of config.json)."""
        d = dataclasses.asdict(self)
        d["unfreeze_patterns"] = list(self.unfreeze_patterns)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, strict: bool = False) -> TrainConfig:
        """Inverse of to_dict. strict: an unknown key is an error naming the nearest options
        (config files); otherwise it is ignored (config.json from other versions)."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in d if k not in names]
        if strict and unknown:
            raise ConfigError(unknown_options(unknown))
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
        aug = kw.get("augment", {})
        if isinstance(aug, Mapping):
            kw["augment"] = Augment(**_known(Augment, aug, strict))
        return cls(**kw)

    def with_overrides(self, overrides: Mapping[str, Any]) -> TrainConfig:
        """A copy with options replaced; augmentation fields may be given flat (hflip=False)."""
        names = {f.name for f in dataclasses.fields(self)}
        aug_names = {f.name for f in dataclasses.fields(Augment)}
        unknown = [k for k in overrides if k not in names | aug_names]
        if unknown:
            raise ConfigError(unknown_options(unknown))
        top = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items() if k in names}
        if isinstance(top.get("augment"), Mapping):
            top["augment"] = Augment(**_known(Augment, top["augment"], True))
        flat_aug = {k: v for k, v in overrides.items() if k in aug_names and k not in names}
        c = dataclasses.replace(self, **top)
        return dataclasses.replace(c, augment=dataclasses.replace(c.augment, **flat_aug)) if flat_aug else c


def _known(cls, d: Mapping[str, Any], strict: bool) -> dict:
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in d if k not in names]
    if strict and unknown:
        raise ConfigError(unknown_options(unknown))
    return {k: v for k, v in d.items() if k in names}


def unknown_options(names: list[str]) -> str:
    """'Unknown train option 'x'. Did you mean: y?' for option names that do not exist."""
    valid = [f.name for f in dataclasses.fields(TrainConfig)] + [f.name for f in dataclasses.fields(Augment)]
    parts = [f"{n!r}.{did_you_mean(n, valid)}" for n in sorted(names)]
    return f"Unknown train option {' '.join(parts)} See `headstart train --help` for every option."


def _cross_checks(c: TrainConfig) -> None:
    """Rules that involve two options."""
    if c.cache_views > 1 and c.strategy not in ("extract", "linear-probe") and not c.cache_prefix:
        raise ConfigError(
            f"--cache-views {c.cache_views} applies to cached features (--strategy extract or "
            f"linear-probe) and cached prefix maps (--cache-prefix); --strategy {c.strategy} sees a "
            "fresh augmentation every epoch already."
        )
    if c.tta != "none" and c.strategy in ("extract", "linear-probe"):
        raise ConfigError(
            f"--tta {c.tta} applies to fine-tuning strategies; --strategy {c.strategy} trains on cached "
            "features of the unflipped images. Drop --tta, or fine-tune (--strategy finetune)."
        )
    if c.cache_prefix and c.strategy != "finetune":
        raise ConfigError(
            f"--cache-prefix works only with --strategy finetune (got {c.strategy!r}): it caches "
            "the frozen first blocks and trains the unfrozen rest. Drop --cache-prefix."
        )
    if c.strategy == "linear-probe" and HeadSpec.parse(c.head).kind != "linear":
        raise ConfigError(f"--strategy linear-probe fits a linear head; received --head {c.head}.")
    if c.keep_epoch == "last" and c.patience:
        raise ConfigError(
            f"--patience {c.patience} stops when the validation accuracy stops improving, a choice made "
            "on the validation split; --keep-epoch last promises none. Drop one of the two."
        )
    if c.cache_prefix and c.feature_blocks > 1:
        raise ConfigError(
            f"--cache-prefix trains on the last block's pooled features only; --feature-blocks "
            f"{c.feature_blocks} pools earlier blocks too. Use one of the two."
        )


def load_config_file(path: str | os.PathLike) -> dict:
    """Options from a YAML or JSON file; a run's config.json (options under "options") works too."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"--config {str(path)!r} cannot be read: {e.strerror or e}.") from e
    try:
        if path.suffix.lower() == ".json":
            d = json.loads(text)
        else:
            import yaml

            d = yaml.safe_load(text) or {}
    except (ValueError, ImportError) as e:  # json.JSONDecodeError and yaml.YAMLError are ValueErrors
        raise ConfigError(f"--config {str(path)!r} is not valid YAML/JSON: {e}") from e
    except Exception as e:  # noqa: BLE001 - yaml.YAMLError is not a ValueError
        raise ConfigError(f"--config {str(path)!r} is not valid YAML/JSON: {e}") from e
    if isinstance(d, dict) and isinstance(d.get("options"), dict):  # a run's config.json
        d = d["options"]
    if not isinstance(d, dict):
        raise ConfigError(f"--config {str(path)!r} must hold a mapping of option names to values.")
    return d


def as_config(config: TrainConfig | Mapping[str, Any] | str | os.PathLike | None) -> TrainConfig:
    """A TrainConfig from a TrainConfig, a mapping of options, or a YAML/JSON file (None: defaults)."""
    if config is None:
        return TrainConfig()
    if isinstance(config, TrainConfig):
        return config
    if isinstance(config, Mapping):
        return TrainConfig.from_dict(config, strict=True)
    return TrainConfig.from_dict(load_config_file(config), strict=True)
