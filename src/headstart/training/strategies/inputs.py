"""What strategies feed the loop: cached features, cached prefix maps, or images."""

from __future__ import annotations

from torchvision.transforms import v2 as T

from headstart.core import digest
from headstart.data.loading import ImageDataset
from headstart.data.transforms import eval_transform, train_transform
from headstart.features.live_prefix import live_prefix
from headstart.features.prefix import prefix_datasets
from headstart.features.views import feature_datasets
from headstart.models.tta import StackViews
from headstart.training.setup import Run, check_bad_fraction
from headstart.training.strategies.base import Inputs


def feature_inputs(run: Run) -> Inputs:
    """The frozen backbone runs once per image (cached on disk); the head trains on the features."""
    f = feature_datasets(
        run.backbone, run.split, run.preprocess, run.cfg.feature_options(), run.device, run.dist
    )
    check_bad_fraction(f.failed, run.split, run.cfg.max_bad_fraction)
    identity = digest.tensors_checksum([("train", f.train.x), ("val", f.val.x)])
    return Inputs(
        run.model.head,
        f.train,
        f.val,
        workers=0,
        decodes_images=False,
        failed=f.failed,
        seconds=f.seconds,
        stats=f.stats,
        identity=identity,
    )


def prefix_inputs(run: Run) -> Inputs:
    """The frozen prefix runs once per image (cached maps); the suffix and head train on the maps."""
    p = prefix_datasets(run.model, run.split, run.preprocess, run.cfg.feature_options(), run.device, run.dist)
    check_bad_fraction(p.failed, run.split, run.cfg.max_bad_fraction)
    return Inputs(
        p.net,
        p.train,
        p.val,
        workers=0,
        decodes_images=False,
        failed=p.failed,
        seconds=p.seconds,
        stats=p.stats,
        identity=p.key,
    )


def image_inputs(run: Run) -> Inputs:
    """Images decoded every epoch, with the training augmentation. The net is the whole model, or,
    where the first blocks stay frozen, the live prefix (live_prefix) and the trainable rest."""
    pp, draft, cfg = run.preprocess, run.preprocess.resize_size, run.cfg
    live = live_prefix(run.model, run.split, pp, cfg.feature_options(), run.device, epochs=cfg.epochs,
                       distributed=run.dist.enabled)  # fmt: skip
    uint8 = live is not None  # the live prefix normalises on the device, as frozen extraction does
    augmented = train_transform(pp, cfg.augment, uint8=uint8)
    train = ImageDataset(run.split.train, augmented, draft=draft, seed=cfg.seed)
    val_tf = eval_transform(pp, uint8=uint8)
    if cfg.tta != "none":  # each validation image as its stacked TTA views (models/tta.py)
        val_tf = T.Compose([val_tf, StackViews(cfg.tta)])
    val = ImageDataset(run.split.val, val_tf, draft=draft)
    net, stats = (live.net, live.stats) if live else (run.model, {})
    return Inputs(net, train, val, workers=cfg.num_workers, decodes_images=True, stats=stats)
