"""Fine-tune on cached activations of the frozen prefix (`train --strategy finetune --cache-prefix`).

When the first blocks of the backbone stay frozen, their output for an image never changes. It is
computed once per image (eval mode, un-augmented eval transform, the BN-folded channels-last fast
path) and streamed into the feature cache as float16 rows, one flattened C*H*W map per image;
the epochs then read the maps back through memory-mapped shards and run only the trainable
suffix and the head. The augmentations are flips of the cached map, an approximation of
flipping the image (the prefix's convolutions and padding are not exactly mirror-symmetric), and,
with --cache-views K, K-1 cached maps of augmented crops of each training image, one per epoch.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from torchvision.transforms import v2 as T

from headstart.core import logs
from headstart.core.distributed import DistInfo
from headstart.core.errors import ConfigError, DataError
from headstart.data.layout import DataSplit, Skipped
from headstart.data.transforms import Preprocess, eval_transform, train_transform
from headstart.features.cache import FeatureCache
from headstart.features.engine import ORT, EngineChoice
from headstart.features.extract import Features, cache_stats, extract_features
from headstart.features.views import (
    FeatureOptions,
    augment_spec,
    cache_spec,
    engine_source,
    extract_options,
    open_cache,
    with_engine,
)
from headstart.models.freezing import FrozenBNStaysEval
from headstart.models.transfer import TransferModel
from headstart.models.tta import View, num_views


def module_chain(body: nn.Module) -> list[tuple[str, nn.Module]]:
    """The body's children in registration order, with nn.Sequential containers expanded."""
    out: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            if isinstance(child, nn.Sequential) and len(child) > 0:  # runs its children in order
                walk(f"{prefix}{name}.", child)
            else:
                out.append((f"{prefix}{name}", child))

    walk("", body)
    return out


class Prefix(nn.Module):
    """The frozen first modules: images -> flattened activation maps [B, C*H*W]."""

    def __init__(self, modules: list[nn.Module], config, shape: tuple[int, ...]):
        super().__init__()
        self.layers = nn.Sequential(*modules)
        self.config = config  # fastpath checks the folded copy on an input of config.input_size
        self.shape = tuple(shape)

    @property
    def feature_dim(self) -> int:
        """Width of one flattened map."""
        return math.prod(self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened maps in (C, H, W) order, whatever the memory format."""
        return self.layers(x).flatten(1)


class Suffix(FrozenBNStaysEval):
    """The trainable rest of the backbone plus the head: activation maps -> logits.

    Shares its modules with the TransferModel, so training it trains that model.
    """

    def __init__(self, modules: list[nn.Module], head: nn.Module):
        super().__init__()
        self.layers = nn.Sequential(*modules)
        self.head = head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features [B, D] (flattened, as Backbone.forward returns them)."""
        return self.layers(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits."""
        return self.head(self.features(x))


@dataclass
class PrefixSplit:
    """A backbone cut at its first trainable module."""

    prefix: Prefix
    suffix: Suffix
    at: str  # name of the first suffix module, e.g. body.blocks.5.0
    shape: tuple[int, ...]  # one image's cached map (C, H, W)


def split_model(model: TransferModel, *, input_size: int) -> PrefixSplit:
    """Cut the backbone before its first trainable module; ConfigError where that is not possible.

    The cut is checked: prefix then suffix must give the backbone's own features on a random batch.
    """
    backbone = model.backbone
    name = backbone.config.name

    def cannot(reason: str) -> ConfigError:
        return ConfigError(
            f"--cache-prefix cannot split backbone {name!r}: {reason}. Train without "
            "--cache-prefix (ordinary finetune works for every backbone)."
        )

    body = backbone.body
    if any(True for _ in body.parameters(recurse=False)) or any(True for _ in body.buffers(recurse=False)):
        raise cannot(
            "its body holds tensors of its own (e.g. a class token), so it is not a chain of modules"
        )
    chain = module_chain(body)
    first = next((i for i, (_, m) in enumerate(chain) if any(p.requires_grad for p in m.parameters())), None)
    if first is None:
        raise cannot("no backbone module trains, so there is no suffix to fine-tune")
    if first == 0:
        raise cannot(f"its first module {chain[0][0]!r} trains, so nothing frozen is left to cache")
    pre, post = [m for _, m in chain[:first]], [m for _, m in chain[first:]]
    device = next(backbone.parameters()).device
    gen = torch.Generator().manual_seed(0)  # leaves the global RNG (shuffles, dropout) untouched
    x = torch.randn(2, 3, input_size, input_size, generator=gen).to(device)
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.inference_mode():
            maps = nn.Sequential(*pre)(x)
            split_out = Suffix(post, nn.Identity()).features(maps)
            full = backbone(x)
    except Exception as e:  # noqa: BLE001 - a forward that is not a plain chain fails in many ways
        raise cannot(f"running its modules in order fails ({type(e).__name__}: {e})") from e
    finally:
        backbone.train(was_training)
    if split_out.shape != full.shape or not torch.allclose(split_out, full, rtol=1e-4, atol=1e-5):
        raise cannot("running its modules in order does not reproduce its forward (not a sequential chain)")
    shape = tuple(maps.shape[1:])
    return PrefixSplit(
        Prefix(pre, backbone.config, shape), Suffix(post, model.head), f"body.{chain[first][0]}", shape
    )


class CachedMaps(Dataset):
    """Cached prefix maps read row by row from the memory-mapped shards, flipped at random if asked.

    With augmented `views` (each a list of (cache, row) aligned with `rows`), every epoch serves one
    of the 1 + len(views) maps of each image, picked by (seed, epoch, index) so resumed runs match.
    """

    def __init__(self, cache: FeatureCache, rows, shape, y, index, *, hflip=False, vflip=False, keep=None,
                 views=(), seed: int = 0, tta_views=()):  # fmt: skip
        self.cache, self.rows, self.shape = cache, rows, tuple(shape)
        # validation under TTA: each image's maps of its test-time views (models/tta.py), exact, as
        # the deployed model computes them; served stacked [1 + len(tta_views), C, H, W]
        self.tta_views = list(tta_views)
        self.y, self.index = y, index
        self.hflip, self.vflip = hflip, vflip
        self.views, self.seed, self.epoch = list(views), seed, 0
        self._keep = keep  # a temporary cache folder lives as long as the dataset

    def __len__(self) -> int:
        return len(self.rows)

    def _source(self, i: int) -> tuple[FeatureCache, tuple[str, int]]:
        """Where image i's map of this epoch lies."""
        if self.views:
            v = zlib.crc32(f"{self.seed}:{self.epoch}:{int(self.index[i])}".encode()) % (1 + len(self.views))
            if v:
                return self.views[v - 1][i]
        return self.cache, self.rows[i]

    def __getitem__(self, i: int):
        if self.tta_views:
            return self.take([i])[0], int(self.y[i]), int(self.index[i]), None
        cache, row = self._source(i)
        x = torch.from_numpy(cache.read([row], math.prod(self.shape))[0])
        x = x.view(self.shape).float()
        # flips of the map stand in for flips of the image (approximate; see the module docstring)
        if self.hflip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        if self.vflip and torch.rand(()) < 0.5:
            x = x.flip(-2)
        return x, int(self.y[i]), int(self.index[i]), None

    def take(self, rows: list[int]) -> torch.Tensor:
        """The maps of `rows` as one float32 batch [B, C, H, W], read shard by shard and flipped at
        random per map (the batched form of __getitem__, for SlicedBatches)."""
        dim = math.prod(self.shape)
        if self.tta_views:  # [B, V, C, H, W]: the un-augmented map, then each test-time view's
            parts = [self.cache.read([self.rows[i] for i in rows], dim)]
            parts += [c.read([r[i] for i in rows], dim) for c, r in self.tta_views]
            return torch.from_numpy(np.stack(parts, 1)).view(len(rows), len(parts), *self.shape).float()
        if self.views:
            sources = [self._source(i) for i in rows]
            x = torch.empty(len(rows), dim, dtype=torch.float16)
            for cache in {id(c): c for c, _ in sources}.values():  # one gather per cache
                pos = [k for k, (c, _) in enumerate(sources) if c is cache]
                x[pos] = torch.from_numpy(cache.read([sources[k][1] for k in pos], dim))
        else:
            x = torch.from_numpy(self.cache.read([self.rows[i] for i in rows], dim))
        x = x.view(len(rows), *self.shape).float()
        for flip, dim in ((self.hflip, -1), (self.vflip, -2)):
            if flip:
                chosen = torch.rand(len(rows)) < 0.5
                x[chosen] = x[chosen].flip(dim)
        return x


def map_views(split: DataSplit, pp: Preprocess, opts: FeatureOptions, spec: dict, base: Features,
              kw: dict) -> list[tuple[FeatureCache, Features]]:  # fmt: skip
    """Maps of views 1..K-1 of the training images that loaded (the training augmentation, seeded
    by (seed, view, path)), each view's rows in the augmented-views cache."""
    if opts.views <= 1:
        return []
    cache = open_cache(spec, opts, views=augment_spec(opts))
    tf = train_transform(pp, opts.augment, uint8=True)
    out = []
    for v in range(1, opts.views):
        f = extract_features(split.train, tf, desc=f"prefix train view {v}", view=v, augment_seed=opts.seed,
                             subset=base.index.tolist(), **{**kw, "cache": cache})  # fmt: skip
        out.append((cache, f))
    return out


def tta_maps(split: DataSplit, pp: Preprocess, opts: FeatureOptions, spec: dict, base: Features,
             kw: dict) -> list[tuple[FeatureCache, Features]]:  # fmt: skip
    """Maps of the validation images' test-time views after the first (the mirror for hflip), each
    in its own cache; an image that fails in a view fails the run's validation set as a whole."""
    out = []
    for k in range(1, num_views(opts.tta)):
        cache = open_cache(spec, opts, views=f"tta-{opts.tta}-{k}")
        tf = T.Compose([eval_transform(pp, uint8=True), View(opts.tta, k)])  # as the predictor flips
        f = extract_features(split.val, tf, desc=f"prefix val, test-time view {k}", **{**kw, "cache": cache})
        if f.index.tolist() != base.index.tolist():  # the same files, read twice: one changed between
            lost = [split.val[i][0] for i in sorted(set(base.index.tolist()) - set(f.index.tolist()))]
            raise DataError(
                f"{len(lost)} validation image(s) read for the plain view failed for test-time view {k} "
                f"({', '.join(map(repr, lost[:3]))}): a file changed while the run read it. Fix or remove "
                "it and run again (the maps computed so far stay in the cache)."
            )
        out.append((cache, f))
    return out


def align_entries(view: Features, cache: FeatureCache, base: Features, base_cache: FeatureCache) -> list:
    """(cache, row) of each image's map in this view, in `base`'s order; an image that failed in
    the view (a file changed or broke since) keeps its un-augmented map."""
    row = {int(i): r for i, r in zip(view.index.tolist(), view.rows, strict=True)}
    return [(cache, row[int(i)]) if int(i) in row else (base_cache, b)
            for i, b in zip(base.index.tolist(), base.rows, strict=True)]  # fmt: skip


@dataclass
class PrefixInputs:
    """What the training loop needs from the cached prefix."""

    net: Suffix
    train: CachedMaps
    val: CachedMaps
    failed: list[Skipped]
    seconds: float
    stats: dict
    key: str  # cache model key: identity of the maps, for --resume


def prefix_spec(model: TransferModel, sp: PrefixSplit, pp: Preprocess, engine: EngineChoice) -> dict:
    """What identifies a prefix's cached maps (cache_spec): the backbone, where it is cut, the map shape."""
    return cache_spec(model.backbone, pp, engine, prefix_split=sp.at, map_shape=list(sp.shape))


def prefix_datasets(model: TransferModel, split: DataSplit, pp: Preprocess, opts: FeatureOptions, device,
                    dist: DistInfo = DistInfo()) -> PrefixInputs:  # fmt: skip
    """Split the model, cache the prefix maps of train and val once, and serve them as datasets."""
    if dist.enabled:
        raise ConfigError("--cache-prefix runs in a single process; run it without torchrun.")
    sp = split_model(model, input_size=pp.input_size)
    tmp = None
    if not opts.cache:  # --no-cache: a private cache that disappears with the datasets
        tmp = tempfile.TemporaryDirectory(prefix="headstart-prefix-")
        opts = dataclasses.replace(opts, cache=True, cache_dir=tmp.name)

    def spec_on(engine: EngineChoice) -> dict:
        return prefix_spec(model, sp, pp, engine)

    def maps(engine: EngineChoice):
        spec = spec_on(engine)
        cache = open_cache(spec, opts)
        source = engine_source(sp.prefix, pp, opts, device, engine, spec)
        kw = extract_options(pp, opts, device, cache) | {"load": False, "engine": source,
                                                          "dim": sp.prefix.feature_dim}  # fmt: skip
        tf = eval_transform(pp, uint8=True)
        ftr = extract_features(split.train, tf, desc="prefix train", **kw)
        fva = extract_features(split.val, tf, desc="prefix val", **kw)
        views = map_views(split, pp, opts, spec, ftr, kw)
        return cache, source, ftr, fva, views, tta_maps(split, pp, opts, spec, fva, kw)

    n = len(split.train) * opts.views + len(split.val) * num_views(opts.tta)
    cache, source, ftr, fva, views, tta = with_engine(maps, opts, device, n, spec_on(EngineChoice(ORT)))
    secs = ftr.seconds + fva.seconds + sum(f.seconds for _, f in views + tta)
    stats = cache_stats(ftr, fva, *(f for _, f in views + tta))
    hits, misses = stats["features_from_cache"], stats["features_extracted"]
    aug = opts.augment
    logs.info(
        f"cache-prefix: frozen prefix up to {sp.at} cached as {'x'.join(map(str, sp.shape))} float16 maps "
        f"({hits + misses} images, {misses} computed, {hits} from cache, "
        f"hit rate {stats['cache_hit_rate']:.0%}, "
        f"{secs:.1f}s); epochs train the suffix and head with "
        + ("map flips" if aug.hflip or aug.vflip else "no flips")
        + (" and CutMix/mixup of the maps" if aug.cutmix or aug.mixup else "")
        + (
            f" and {len(views)} augmented views of each training image"
            if views
            else " and no other augmentation (random crops, rotation and colour jitter cannot be "
            "applied to cached maps; --cache-views K caches K-1 augmented views, --cutmix 1 mixes maps)"
        )
        + ("; validation averages each image with its mirror (maps of the mirrored images)" if tta else "")
    )
    aligned = [align_entries(f, c, ftr, cache) for c, f in views]
    train_ds = CachedMaps(cache, ftr.rows, sp.shape, ftr.y, ftr.index, hflip=aug.hflip, vflip=aug.vflip,
                          keep=tmp, views=aligned, seed=opts.seed)  # fmt: skip
    val_ds = CachedMaps(cache, fva.rows, sp.shape, fva.y, fva.index, keep=tmp,
                        tta_views=[(c, f.rows) for c, f in tta])  # fmt: skip
    stats = {"cache_prefix": True, "prefix_split": sp.at, "prefix_map_shape": list(sp.shape), **stats,
             "frozen_engine": source.record}  # fmt: skip
    return PrefixInputs(sp.suffix, train_ds, val_ds, ftr.failed + fva.failed, secs, stats, cache.dir.name)
