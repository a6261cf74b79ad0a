"""The recipes `auto` considers, and what each costs on this machine (seconds, from measured speeds).

Three kinds, by what the epochs read:
  features  the frozen backbone runs once per image (cached); a head or a linear probe trains on it
  prefix    the frozen first blocks run once per image (cached maps); the last 1-3 groups train
  images    images decoded and augmented every epoch; the last 2 groups (the frozen rest on the
            frozen engine, without autograd), or every layer, train
"""

from __future__ import annotations

from dataclasses import dataclass, field

from headstart.features.engine import MIN_IMAGES_FOR_ORT, ORT
from headstart.models.tta import num_views
from headstart.training.auto.profile import REFERENCE, DataProfile, Speed

BASE = "efficientnet_lite0"
LARGER = {"efficientnet_lite1": 240, "efficientnet_lite2": 260}  # other embedded backbones, native size
RUN_OVERHEAD = 3.0  # seconds every run spends outside its epochs (model, setup, files)
AUGMENTED_GROUPS = 2  # trainable block groups of the augmented fine-tuning on images (the only one)
# trainable block groups of the larger backbones' fine-tuning on cached maps (long budgets). On a
# CIFAR-10 development split (10,000 training images), 2 groups at 192 px, 4 epochs, lite2 scored
# 0.8795 against lite0's 0.8715 with test-time flips, in 1.23x the time; 5 epochs, 0.866 against
# 0.868: within noise, so the inner split decides, not a rule
LARGER_GROUPS = 2
# fine-tuned recipes predict with the mirror too (models/tta.py): +0.4 to +1.05 points on a CIFAR-10
# development split, for a second forward pass of each validation image
TTA = "hflip"
HEAD_RATE = 1e5  # images/s of head epochs on cached features (linear head, batch 32, 2 cores)


@dataclass
class Candidate:
    """One recipe: TrainConfig options, and what its time is made of."""

    name: str
    kind: str  # features | prefix | images
    options: dict
    size: int
    backbone: str = BASE
    groups: int = 0  # trainable block groups (prefix, images; 0 with strategy full: every layer)
    scores: list[dict] = field(default_factory=list)  # one entry per search stage it ran in

    @property
    def cost_kind(self) -> str:
        """What its time is made of, for learning corrections: the probe's fit is its own kind."""
        return "probe" if self.options.get("strategy") == "linear-probe" else self.kind

    def run_options(self, cfg) -> dict:
        """The TrainConfig options of a run of this recipe; no TTA where the user turned flips off."""
        return {**self.options, "tta": self.options.get("tta", "none") if cfg.augment.hflip else "none"}

    @property
    def views(self) -> int:
        """Forward passes per validation image (test-time views)."""
        return num_views(self.options.get("tta", "none"))

    def epochs(self, stage_epochs: int | None) -> int:
        """Epochs a run of this recipe trains for (head epochs of features keep their default)."""
        return 30 if self.kind == "features" else max(1, stage_epochs or 1)


def sizes_for(profile: DataProfile) -> list[int]:
    """Input sizes worth trying, from the images themselves: small images need not be blown up to
    224, but pretrained filters see better at some upscaling (e.g. 32 px -> 128 and 192)."""
    side = profile.short_side
    if side >= 180:
        return [224]
    if side >= 96:
        return [160, 224]
    return [128, 192]


def grid(profile: DataProfile, speed: Speed, backbone: str = BASE) -> list[Candidate]:
    """Every recipe worth a pilot on this data (the budget decides which are affordable)."""
    sizes = sizes_for(profile)
    big = sizes[-1]
    c = [
        Candidate("extract", "features", {"strategy": "extract"}, REFERENCE, backbone),
        Candidate(
            "extract, 3 blocks", "features", {"strategy": "extract", "feature_blocks": 3}, REFERENCE, backbone
        ),
        Candidate("linear probe", "features", {"strategy": "linear-probe"}, REFERENCE, backbone),
    ]
    for size in sizes:
        c.append(_prefix(backbone, 2, size, 1.0))
    c += [_prefix(backbone, 1, big, 1.0), _prefix(backbone, 3, big, 1.0), _prefix(backbone, 2, big, 0.1)]
    g = AUGMENTED_GROUPS
    augmented = {
        "strategy": "finetune",
        "unfreeze": g,
        "image_size": big,
        "backbone_lr_mult": 1.0,
        "tta": TTA,
    }
    c.append(
        Candidate(f"finetune {g} groups, augmented, {big}px", "images", augmented, big, backbone, groups=g)
    )
    if speed.full_train:  # every layer trains, the backbone at the default 0.1 x the head's lr
        options = {"strategy": "full", "image_size": big, "tta": TTA}
        c.append(Candidate(f"full fine-tuning, augmented, {big}px", "images", options, big, backbone))
    for name, size in LARGER.items():  # measured where auto considers them (search.measure_for)
        if name in speed.forward and name != backbone:
            options = {"strategy": "extract", "backbone": name}
            c.append(Candidate(f"extract {name}", "features", options, size, backbone=name))
        if name in speed.larger_suffix and name != backbone:  # long budgets: fine-tuned too
            c.append(_prefix(name, LARGER_GROUPS, big, 1.0, other=True))
    return c


def _prefix(backbone: str, groups: int, size: int, mult: float, *, other: bool = False) -> Candidate:
    """Fine-tuning on cached maps; `other`: of an embedded backbone other than the run's."""
    options = {
        "strategy": "finetune",
        "cache_prefix": True,
        "unfreeze": groups,
        "image_size": size,
        "backbone_lr_mult": mult,
        "tta": TTA,
        **({"backbone": backbone} if other else {}),
    }
    of = f" of {backbone}" if other else ""
    name = f"finetune {groups} groups{of} on cached maps, {size}px, backbone lr x{mult:g}"
    return Candidate(name, "prefix", options, size, backbone, groups=groups)


def suffix_rate(speed: Speed, c: Candidate) -> float:
    """Training img/s at REFERENCE px of `c` on cached maps: a larger backbone's own where measured."""
    if c.groups == LARGER_GROUPS and c.backbone in speed.larger_suffix:
        return speed.larger_suffix[c.backbone]
    return speed.suffix_train[c.groups]


def extraction_seconds(
    speed: Speed, backbone: str, images: int, *, px: float = 1.0, cached: float = 0.0
) -> float:
    """Seconds to decode `images` images and run the frozen backbone over them once (features or
    cached maps), on the engine that would: ONNX Runtime from MIN_IMAGES_FOR_ORT images on."""
    todo = images * (1 - cached)
    on_ort = speed.engine == ORT and images >= MIN_IMAGES_FOR_ORT and backbone in speed.engine_forward
    if on_ort and cached < 1:
        # features/engine.py: its rate, plus one export of the frozen part
        rate = speed.engine_forward[backbone] / px
        return speed.export_seconds + todo / max(1e-6, min(rate, speed.decode))
    return todo / max(1e-6, min(speed.forward[backbone] / px, speed.decode))


def seconds(c: Candidate, speed: Speed, *, n: int, m: int, epochs: int, cached: float = 0.0) -> float:
    """Predicted wall time of one run of `c` on n training and m validation images.

    `cached` is the share of the images whose features (or maps) are already in the cache.
    """
    px = (c.size / REFERENCE) ** 2
    mv = m * c.views  # a prefix run also caches the maps of each validation image's mirror
    extract = extraction_seconds(
        speed, c.backbone, n + (mv if c.kind == "prefix" else m), px=px, cached=cached
    )
    epochs = c.epochs(epochs)
    factor = speed.correction.get(c.cost_kind, 1.0)
    if c.kind == "features":
        # the probe's cross-validated fit: 13 C values x 5 folds on up to 10,000 images, then all of them
        fit = (1 + 0.04 * min(n, 10_000) + 0.002 * n) if c.cost_kind == "probe" else 0.0
        return RUN_OVERHEAD + factor * (extract + epochs * (n + m) / HEAD_RATE + fit)
    if c.kind == "prefix":
        train = suffix_rate(speed, c) / px
        return RUN_OVERHEAD + factor * (extract + epochs * (n / train + mv / (3 * train)))
    rate, val_rate, export = _image_rates(speed, c, passes=epochs * (n + m))
    train = min(rate / px, speed.decode)
    val = min(val_rate / px / c.views, speed.decode)  # each image decoded once, run once per view
    return RUN_OVERHEAD + factor * (export + epochs * (n / train + m / val))


def _image_rates(speed: Speed, c: Candidate, *, passes: int) -> tuple[float, float, float]:
    """Training and validation img/s at REFERENCE px of a run on images, and the export it pays.
    Where the first blocks stay frozen they run on the frozen engine (features/live_prefix.py):
    on ONNX Runtime from MIN_IMAGES_FOR_ORT passes on, their share of each step (the measured
    step less the suffix's) shrinks by ONNX Runtime's speed-up over PyTorch's forward."""
    forward = speed.forward[c.backbone]
    if c.options.get("strategy") == "full":
        return speed.full_train, forward, 0.0
    rate = speed.image_train[c.groups]
    if not (speed.engine == ORT and passes >= MIN_IMAGES_FOR_ORT and c.backbone in speed.engine_forward):
        return rate, forward, 0.0
    faster = speed.engine_forward[c.backbone] / forward
    suffix = speed.suffix_train[c.groups]
    train = 1 / suffix + max(0.0, 1 / rate - 1 / suffix) / faster
    # validation: the suffix's forward (a third of its step) stays on PyTorch, the prefix moves
    val = 1 / (3 * suffix) + max(0.0, 1 / forward - 1 / (3 * suffix)) / faster
    return 1 / train, 1 / val, speed.export_seconds


def learn(speed: Speed, kind: str, predicted: float, actual: float) -> None:
    """Fold one run's actual seconds into its kind's correction: summed actual over summed
    uncorrected predicted time (less the fixed overhead) of every run of the kind so far, so long
    runs weigh most. The first alone misled: on 5,000 CIFAR-10 images a cold 12 s pilot set 1.2,
    and the final, predicted 258 s, took 197."""
    factor = speed.correction.get(kind, 1.0)
    raw = (predicted - RUN_OVERHEAD) / factor
    if raw <= RUN_OVERHEAD:  # too short to tell the model's time from the overhead
        return
    done, planned = speed.observed.get(kind, (0.0, 0.0))
    speed.observed[kind] = (done + max(0.0, actual - RUN_OVERHEAD), planned + raw)
    speed.correction[kind] = min(4.0, max(0.5, speed.observed[kind][0] / speed.observed[kind][1]))
