"""The feature pipeline of frozen-backbone training: features of the train and val images (plus
K-1 augmented views of each training image), from the cache or computed once, served as datasets."""

from __future__ import annotations

import dataclasses
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from headstart.core import logs
from headstart.core.distributed import DistInfo, all_gather_objects, shard
from headstart.data.layout import DataSplit, Skipped
from headstart.data.transforms import PIXELS, Augment, Preprocess, eval_transform, train_transform
from headstart.features.cache import FeatureCache, default_cache_dir, model_key, weights_checksum
from headstart.features.engine import (
    ORT,
    EngineChoice,
    EngineSource,
    EngineUnavailable,
    choose_engine,
    engine_path,
    fall_back,
)
from headstart.features.extract import Features, cache_stats, extract_features


@dataclass(frozen=True)
class FeatureOptions:
    """How features are computed and kept: the cache, loader workers, augmented views."""

    cache: bool = True
    cache_dir: str | None = None
    num_workers: int | None = None
    views: int = 1  # feature views per training image: the eval view + views-1 augmented ones
    augment: Augment = field(default_factory=Augment)
    seed: int = 0
    compile: bool = False
    engine: str = "auto"  # auto, torch or onnxruntime: where frozen features and maps are computed
    tta: str = "none"  # test-time views of the validation images (models/tta.py); prefix maps only


class FeatureDataset(Dataset):
    """Cached features served in the same (x, label, index, error) form as images.

    With augmented `views` (each aligned row for row with `x`), every epoch serves one of the
    1 + len(views) views of each image, picked by (seed, epoch, index) so resumed runs match.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, views=(), seed: int = 0):
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

    def take(self, rows: list[int]) -> torch.Tensor:
        """Features [len(rows), D] as float32, each row in this epoch's view (as __getitem__ serves it)."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        x = self.x[idx].float()
        if self.views:
            k = 1 + len(self.views)
            pick = torch.tensor([zlib.crc32(f"{self.seed}:{self.epoch}:{int(self.index[i])}".encode()) % k
                                 for i in rows])  # fmt: skip
            for v, view in enumerate(self.views, start=1):
                chosen = pick == v
                if chosen.any():
                    x[chosen] = view[idx[chosen]].float()
        return x

    def all_views(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every view as a sample: (x, y, image index) for the linear probe."""
        k = 1 + len(self.views)
        return torch.cat([self.x, *self.views]), self.y.repeat(k), self.index.repeat(k)


@dataclass
class FeatureInputs:
    """Train and val feature datasets, the files that failed to load, seconds and cache figures."""

    train: FeatureDataset
    val: FeatureDataset
    failed: list[Skipped]
    seconds: float
    stats: dict


def cache_spec(backbone, pp: Preprocess, engine: EngineChoice, **extra) -> dict:
    """What identifies the rows of a feature cache: the frozen module, its exact weights, the
    preprocessing, the engine (when not PyTorch) and `extra` (e.g. a prefix split)."""
    spec = {
        "backbone": backbone.config.name,
        "arch": backbone.config.arch,
        "weights": weights_checksum(backbone),
        "preprocess": pp.to_dict(),
        "pixels": PIXELS,
        **extra,
    }
    if backbone.config.feature_blocks > 1:  # absent otherwise, so existing caches keep their keys
        spec["feature_blocks"] = backbone.config.feature_blocks
    if engine.name != "torch":  # likewise: PyTorch rows keep the keys they always had
        spec["frozen_engine"] = engine.name
    return spec


def cache_root(opts: FeatureOptions) -> Path:
    """The cache folder (engines are kept in it too)."""
    return Path(opts.cache_dir) if opts.cache_dir else default_cache_dir()


def open_cache(spec: dict, opts: FeatureOptions, *, views: str = "eval") -> FeatureCache | None:
    """The feature cache for `spec` (cache_spec) and these views (None if disabled)."""
    if not opts.cache:
        return None
    spec = {**spec, "views": views}
    return FeatureCache(cache_root(opts), model_key(spec), spec)


def engine_store(opts: FeatureOptions) -> Path | None:
    """Exported engines are kept under the cache folder (none without a cache)."""
    return cache_root(opts) / "engines" if opts.cache else None


def engine_source(module, pp: Preprocess, opts: FeatureOptions, device, engine: EngineChoice,
                  spec: dict) -> EngineSource:  # fmt: skip
    """Where `module` runs, on `engine`."""
    return EngineSource(engine, module, pp, device, key=spec, store=engine_store(opts), compile=opts.compile)


def engine_for(opts: FeatureOptions, device, n_images: int, ort_spec: dict) -> EngineChoice:
    """The engine choose_engine picks for `n_images`, knowing whether this frozen part (its cache
    spec on ONNX Runtime: `ort_spec`) was exported before."""
    store = engine_store(opts)
    exported = store is not None and engine_path(ort_spec, store).is_file()
    return choose_engine(opts.engine, device, n_images, compile=opts.compile, exported=exported)


def with_engine(work, opts: FeatureOptions, device, n_images: int, ort_spec: dict):
    """work(EngineChoice), on the engine choose_engine picks; if ONNX Runtime turns out unable
    (export or parity), again on PyTorch, unless ONNX Runtime was asked for by name.
    `ort_spec`: the cache spec on ONNX Runtime, whose engine may already be exported."""
    choice = engine_for(opts, device, n_images, ort_spec)
    try:
        return work(choice)
    except EngineUnavailable as e:
        return work(fall_back(e, choice))


def extract_options(pp: Preprocess, opts: FeatureOptions, device, cache: FeatureCache | None) -> dict:
    """The keyword arguments of extract_features shared by feature and prefix-map extraction."""
    return dict(device=device, batch_size=64, num_workers=opts.num_workers, draft=pp.resize_size, cache=cache)


def feature_datasets(
    backbone, split: DataSplit, pp: Preprocess, opts: FeatureOptions, device, dist: DistInfo = DistInfo()
) -> FeatureInputs:
    """Features of train and val (un-augmented, plus opts.views - 1 augmented views of train), from
    the cache or computed once. Ranks of a torchrun job each extract a strided share, then gather."""
    n = (len(split.train) + len(split.val)) * opts.views
    ort_spec = cache_spec(backbone, pp, EngineChoice(ORT))
    return with_engine(lambda engine: _feature_datasets(backbone, split, pp, opts, device, dist, engine),
                       opts, device, n, ort_spec)  # fmt: skip


def _feature_datasets(backbone, split: DataSplit, pp: Preprocess, opts: FeatureOptions, device,
                      dist: DistInfo, engine: EngineChoice) -> FeatureInputs:  # fmt: skip
    spec = cache_spec(backbone, pp, engine)
    cache = open_cache(spec, opts)
    source = engine_source(backbone, pp, opts, device, engine, spec)
    kw = extract_options(pp, opts, device, cache) | {"engine": source, "dim": backbone.feature_dim}
    tf = eval_transform(pp, uint8=True)

    def features(items: list, desc: str) -> Features:  # each rank a strided share, then gathered
        f = extract_features(items, tf, desc=desc, subset=shard(range(len(items)), dist), **kw)
        return gather_features(f, dist)

    try:
        ftr, fva = features(split.train, "features train"), features(split.val, "features val")
    finally:
        if cache is not None:
            cache.close()
    views = augmented_views(split, pp, opts, ftr.index, dist, spec, kw)
    parts = [ftr, fva, *views]
    secs, n = sum(p.seconds for p in parts), sum(len(p.y) for p in parts)
    stats = cache_stats(*parts)
    hits, misses = stats["features_from_cache"], stats["features_extracted"]
    where = f"cache {cache.dir}" if cache is not None else "no cache"
    logs.info(
        f"features: {n} images in {secs:.1f}s, {misses} extracted ({misses / max(secs, 1e-9):.1f} img/s, "
        f"{source.record['name']}), {hits} from {where} (hit rate {stats['cache_hit_rate']:.0%})"
    )
    # The feature datasets keep item indices, so failures and NaN reports still name files.
    return FeatureInputs(
        FeatureDataset(ftr.x, ftr.y, ftr.index, [align_rows(v, ftr) for v in views], seed=opts.seed),
        FeatureDataset(fva.x, fva.y, fva.index),
        ftr.failed + fva.failed,
        secs,
        stats | {"frozen_engine": source.record},
    )


def augment_spec(opts: FeatureOptions) -> str:
    """The cache's view name of augmented views: the augmentation and its seed."""
    aug = json.dumps(dataclasses.asdict(opts.augment), sort_keys=True)
    return f"train-augment:{aug}:seed={opts.seed}"


def augmented_views(
    split: DataSplit,
    pp: Preprocess,
    opts: FeatureOptions,
    ok: torch.Tensor,
    dist: DistInfo,
    spec: dict,
    kw: dict,
) -> list[Features]:
    """Views 1..K-1 of the training images that loaded: the training augmentation, seeded by
    (seed, view, path), in their own cache (keyed by the augmentation and seed)."""
    if opts.views <= 1:
        return []
    cache = open_cache(spec, opts, views=augment_spec(opts))
    tf = train_transform(pp, opts.augment, uint8=True)
    out = []
    try:
        for v in range(1, opts.views):
            f = extract_features(
                split.train,
                tf,
                desc=f"features train view {v}",
                view=v,
                augment_seed=opts.seed,
                subset=shard(ok.tolist(), dist),
                **{**kw, "cache": cache},
            )
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
        recomputed=sum(p.recomputed for p in parts),
    )
