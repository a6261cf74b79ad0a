"""Feature cache: reuse, exact invalidation, and equivalence with live features."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import headstart
from headstart.backbones import create_backbone
from headstart.cache import FeatureCache, file_key, model_key, weights_checksum
from headstart.runs import load_weights

from conftest import TINY

FAST = dict(backbone=TINY, weights="none", epochs=8, lr=0.05, batch_size=8, num_workers=0)


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
    assert "cache_hit_rate" in b.results and b["features_extracted"] == 34
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
