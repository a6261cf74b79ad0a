"""Feature cache: reuse, exact invalidation, and equivalence with live features."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import headstart
from headstart.features.cache import FeatureCache, file_key, model_key, weights_checksum
from headstart.models.backbones import create_backbone
from headstart.models.store import load_weights

from conftest import TINY

FAST = dict(strategy="extract", backbone=TINY, weights="none", epochs=8, lr=0.05, batch_size=8, num_workers=0)


def test_rerun_hits_and_touching_one_file_reextracts_only_it(tiny_split, tmp_path):
    cache = tmp_path / "cache"
    r1 = headstart.train(tiny_split, output=tmp_path / "a", cache_dir=str(cache), **FAST)
    assert (r1["cache_hit_rate"], r1["features_extracted"]) == (0.0, 34)
    r2 = headstart.train(tiny_split, output=tmp_path / "b", cache_dir=str(cache), **FAST)
    assert (r2["cache_hit_rate"], r2["features_extracted"], r2["features_from_cache"]) == (1.0, 0, 34)
    assert r2["val_accuracy"] == r1["val_accuracy"]
    one = sorted((tiny_split / "train" / "red").glob("*.png"))[3]
    st = one.stat()
    os.utime(one, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    r3 = headstart.train(tiny_split, output=tmp_path / "c", cache_dir=str(cache), **FAST)
    assert (r3["features_extracted"], r3["features_from_cache"]) == (1, 33)


def test_other_weights_or_preprocessing_miss(tiny_split, tmp_path):
    cache = tmp_path / "cache"
    headstart.train(tiny_split, output=tmp_path / "a", cache_dir=str(cache), **FAST)
    other = dict(FAST, seed=1)  # random init with another seed: other weights, other key
    r = headstart.train(tiny_split, output=tmp_path / "b", cache_dir=str(cache), **other)
    assert r["cache_hit_rate"] == 0.0
    bb = create_backbone(TINY, weights="none")
    spec = {"backbone": TINY, "weights": weights_checksum(bb), "preprocess": {"input_size": 160}}
    assert model_key(spec) != model_key({**spec, "preprocess": {"input_size": 128}})


def test_cached_training_matches_live_features(tiny_split, tmp_path):
    a = headstart.train(tiny_split, output=tmp_path / "cached", cache_dir=str(tmp_path / "c"), **FAST)
    b = headstart.train(tiny_split, output=tmp_path / "live", cache=False, **FAST)
    assert b.results.cache_hit_rate is not None and b["features_extracted"] == 34
    wa = load_weights(tmp_path / "cached" / "model.safetensors")["head.0.weight"]
    wb = load_weights(tmp_path / "live" / "model.safetensors")["head.0.weight"]
    # float16 storage rounds features by ~5e-4 relative; the heads agree to that order
    assert torch.allclose(wa, wb, atol=5e-3, rtol=1e-2)
    assert a["val_accuracy"] == b["val_accuracy"]
    assert abs(a["val_loss"] - b["val_loss"]) < 5e-3


def test_shards_roundtrip_and_unfinished_shard_is_invisible(tmp_path, tiny_split):
    cache = FeatureCache(tmp_path, "k")
    files = sorted(str(p) for p in (tiny_split / "val").rglob("*.png"))[:3]
    keys = [file_key(f) for f in files]
    w = cache.writer(3, 4)
    w.put([0, 2], [keys[0], keys[2]], np.arange(8, dtype=np.float32).reshape(2, 4))
    shard, rows = w.finish()
    assert rows == [0, 2]  # the row that was never filled is not indexed
    found = cache.lookup(keys)
    assert set(found) == {keys[0], keys[2]}
    got = cache.read([found[keys[2]], found[keys[0]]], 4)
    assert got.dtype == np.float16 and got.tolist() == [[4, 5, 6, 7], [0, 1, 2, 3]]
    w2 = cache.writer(1, 4)
    w2.put([0], [keys[1]], np.ones((1, 4), np.float32))
    w2.abort()
    assert keys[1] not in cache.lookup(keys)
    assert not list((tmp_path / "k" / "shards").glob(".*.tmp"))
    with pytest.raises(FileNotFoundError):
        file_key(str(tmp_path / "missing.png"))


def test_cache_views_extracts_augmented_views_once_and_serves_them(tiny_split, tmp_path):
    from headstart.core.distributed import DistInfo
    from headstart.data.layout import resolve_data
    from headstart.features.views import feature_datasets
    from headstart.training.options import TrainConfig
    from headstart.training.setup import preprocess_of

    cache = tmp_path / "cache"
    r1 = headstart.train(tiny_split, output=tmp_path / "a", cache_dir=str(cache), cache_views=3, **FAST)
    n_train, n_val = r1["num_train"], r1["num_val"]
    assert r1["features_extracted"] == 3 * n_train + n_val  # views 1 and 2 of train, once
    r2 = headstart.train(tiny_split, output=tmp_path / "b", cache_dir=str(cache), cache_views=3, **FAST)
    assert (r2["cache_hit_rate"], r2["features_extracted"]) == (1.0, 0)
    assert r2["val_accuracy"] == r1["val_accuracy"]
    r3 = headstart.train(tiny_split, output=tmp_path / "c", cache_dir=str(cache), **FAST)
    assert r3["cache_hit_rate"] == 1.0  # K = 1 reuses view 0 of the K = 3 runs

    cfg = TrainConfig(data=str(tiny_split), output="-", cache_dir=str(cache), cache_views=3, **FAST)
    bb = create_backbone(TINY, weights="none")
    split = resolve_data(str(tiny_split), seed=0)
    pp, cpu = preprocess_of(bb, None), torch.device("cpu")
    train_ds = feature_datasets(bb, split, pp, cfg.resolved().feature_options(), cpu, DistInfo()).train
    assert len(train_ds.views) == 2
    for v in train_ds.views:  # augmented crops: other features than the eval view, row for row
        assert v.shape == train_ds.x.shape and not torch.allclose(v.float(), train_ds.x.float(), atol=1e-3)
    served = set()
    for epoch in range(8):
        train_ds.epoch = epoch
        x0 = train_ds[0][0]
        views = [train_ds.x, *train_ds.views]
        served |= {k for k, src in enumerate(views) if torch.equal(x0, src[0].float())}
    assert served == {0, 1, 2}  # over epochs an image is served in every one of its views
    x_all, y_all, image_of = train_ds.all_views()
    assert len(x_all) == 3 * n_train and torch.equal(image_of[:n_train], image_of[n_train : 2 * n_train])


def test_cache_views_needs_cached_features(tiny_split, tmp_path):
    with pytest.raises(headstart.ConfigError, match="--cache-views 2 applies to cached features"):
        headstart.train(tiny_split, output=tmp_path / "a", cache_views=2, **{**FAST, "strategy": "finetune"})
