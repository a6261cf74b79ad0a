"""The feature cache trusts nothing on disk: damaged shards and indexes, full disks, killed writers."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import headstart
from headstart.core.errors import DiskFull
from headstart.features.cache import FeatureCache

from conftest import TINY, run_cli

FAST = dict(strategy="extract", backbone=TINY, weights="none", epochs=3, lr=0.05, batch_size=8, num_workers=0)


def _shards(cache: Path) -> list[Path]:
    return sorted(cache.glob("*/shards/*.npy"))


@pytest.fixture
def warm(tiny_split, tmp_path):
    """A clean run that filled a cache; returns (cache folder, its results)."""
    cache = tmp_path / "cache"
    r = headstart.train(tiny_split, output=tmp_path / "clean", cache_dir=str(cache), **FAST)
    assert r.results.features_extracted == 34 and len(_shards(cache)) == 2
    return cache, r.results


def _damage(path: Path, how: str) -> None:
    header = 128  # a float16 .npy header of this shape fits in the first 128 bytes
    data = bytearray(path.read_bytes())
    if how == "zeroed":  # the header intact, the data zeroed: what used to train a wrong model silently
        data[header:] = bytes(len(data) - header)
    elif how == "random":
        data[:] = np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes()
    elif how == "truncated":
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["zeroed", "random", "truncated"])
def test_a_damaged_shard_is_quarantined_and_its_rows_recomputed(warm, tiny_split, tmp_path, how):
    cache, clean = warm
    victim = _shards(cache)[0]
    rows = int(np.load(victim, mmap_mode="r").shape[0]) if how != "random" else None
    _damage(victim, how)
    r = headstart.train(tiny_split, output=tmp_path / "again", cache_dir=str(cache), **FAST)
    res = r.results
    assert res.cache_rows_recomputed > 0 and (rows is None or res.cache_rows_recomputed == rows)
    assert res.features_extracted == res.cache_rows_recomputed and res.cache_hit_rate < 1
    assert res.val_accuracy == clean.val_accuracy and res.val_loss == pytest.approx(clean.val_loss, abs=1e-6)
    assert (victim.parent.parent / "quarantine" / victim.name).exists() and not victim.exists()
    # and the cache is whole again: the next run reads everything from it
    r3 = headstart.train(tiny_split, output=tmp_path / "third", cache_dir=str(cache), **FAST)
    assert (r3.results.cache_hit_rate, r3.results.cache_rows_recomputed) == (1.0, 0)


def test_a_garbage_index_is_moved_aside_and_rebuilt(warm, tiny_split, tmp_path):
    cache, clean = warm
    index = next(cache.glob("*/index.sqlite"))
    index.write_bytes(os.urandom(4096))
    r = run_cli(
        "train",
        "--strategy",
        "extract",
        tiny_split,
        "-o",
        tmp_path / "again",
        "--cache-dir",
        cache,
        "--backbone",
        TINY,
        "--weights",
        "none",
        "--epochs",
        "3",
        "--lr",
        "0.05",
        "--batch-size",
        "8",
        "--workers",
        "0",
    )
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr and "cache index" in r.stderr and "damaged" in r.stderr
    res = json.loads((tmp_path / "again" / "results.json").read_text())
    assert res["val_accuracy"] == clean.val_accuracy and res["features_extracted"] == 34
    assert list(index.parent.glob("index.damaged-*.sqlite"))


def test_leftovers_of_killed_writers_and_unreferenced_shards_are_cleaned(warm):
    cache, _ = warm
    folder = _shards(cache)[0].parent
    stale = folder / ".deadbeef.npy.tmp"
    stale.write_bytes(b"\0" * 1000)
    old = time.time() - 60
    os.utime(stale, (old, old))
    orphan = folder / "0123456789abcdef.npy"
    np.save(orphan, np.zeros((3, 4), np.float16))
    FeatureCache(folder.parent.parent, folder.parent.name).close()  # opening a cache cleans it
    assert not stale.exists() and not orphan.exists() and len(_shards(cache)) == 2


def test_a_live_writers_temporary_is_left_alone(tmp_path):
    cache = FeatureCache(tmp_path, "k")
    writer = cache.writer(10, 4)
    old = time.time() - 60
    os.utime(writer.tmp, (old, old))
    FeatureCache(tmp_path, "k").close()  # another process opening the cache while this one writes
    assert writer.tmp.exists()
    writer.put([0, 1], ["a", "b"], np.ones((2, 4), np.float32))
    shard, rows = writer.finish()
    assert rows == [0, 1] and cache.lookup(["a", "b"]) == {"a": (shard, 0), "b": (shard, 1)}


def test_a_full_disk_is_a_clear_error_and_leaves_nothing_behind(tmp_path, monkeypatch):
    import headstart.features.cache as cache_module

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    cache = FeatureCache(tmp_path, "k")
    monkeypatch.setattr(cache_module.os, "posix_fallocate", full)
    with pytest.raises(DiskFull, match=r"ran out of disk space: a shard of 1000 rows x 256 needs 0\.5 MB"):
        cache.writer(1000, 256)
    monkeypatch.undo()
    writer = cache.writer(4, 2)  # space reserved, then the disk fills under a write anyway
    monkeypatch.setattr(cache_module.os, "pwrite", full)
    with pytest.raises(DiskFull, match="--cache-dir"):
        writer.put([0], ["a"], np.ones((1, 2)))
    assert not list(tmp_path.glob("k/shards/*")) and not list(tmp_path.glob("k/shards/.*"))


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root only): a real full disk."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (not root): the fault-injection test above covers ENOSPC")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_training_on_a_full_cache_disk_stops_with_one_paragraph(tiny_split, tmp_path, small_disk):
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (1024 * 1024 - 4 * 1024))  # a few KB left: the cache cannot hold its shards
    r = run_cli(
        "train",
        "--strategy",
        "extract",
        tiny_split,
        "-o",
        tmp_path / "run",
        "--cache-dir",
        small_disk / "cache",
        "--backbone",
        TINY,
        "--weights",
        "none",
        "--epochs",
        "1",
        "--workers",
        "0",
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "ran out of disk space" in r.stderr and str(small_disk / "cache") in r.stderr
    assert not [p for p in (small_disk / "cache").rglob("*.tmp")] and not list(
        (small_disk / "cache").rglob("*.npy")
    )
    filler.unlink()
    r = run_cli(
        "train",
        "--strategy",
        "extract",
        tiny_split,
        "-o",
        tmp_path / "run",
        "--cache-dir",
        small_disk / "cache",
        "--backbone",
        TINY,
        "--weights",
        "none",
        "--epochs",
        "1",
        "--workers",
        "0",
        "--overwrite",
    )
    assert r.returncode == 0, r.stderr


def test_cache_info_prune_clear(warm):
    cache, _ = warm
    (_shards(cache)[0].parent / ".dead.npy.tmp").write_bytes(b"x")
    old = time.time() - 60
    os.utime(_shards(cache)[0].parent / ".dead.npy.tmp", (old, old))
    r = run_cli("cache", "info", "--cache-dir", cache)
    assert r.returncode == 0 and TINY in r.stdout and "1 entries" in r.stdout and " 34 " in r.stdout
    r = run_cli("cache", "prune", "--cache-dir", cache)
    assert r.returncode == 0 and "removed 0 temporaries" in r.stdout  # info already cleaned it on open
    r = run_cli("cache", "prune", "--cache-dir", cache, "--older-than", "-1")
    assert r.returncode == 0 and "1 unused entries" in r.stdout and not _shards(cache)
    r = run_cli("cache", "clear", "--cache-dir", cache)
    assert r.returncode == 0 and "removed every entry" in r.stdout


@pytest.mark.slow
def test_concurrent_runs_sharing_a_cache_agree_and_leave_no_unreferenced_shards(tiny_split, tmp_path):
    """Three runs extract the same images at once: the index ends up pointing at one shard per
    image, and the shards the others wrote are removed the next time the cache is opened."""
    from conftest import cli_env

    cache = tmp_path / "cache"
    args = [
        "--strategy",
        "extract",
        "--backbone",
        TINY,
        "--weights",
        "none",
        "--epochs",
        "2",
        "--workers",
        "0",
        "--cache-dir",
        str(cache),
    ]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "headstart",
                "train",
                str(tiny_split),
                "-o",
                str(tmp_path / f"r{i}"),
                *args,
            ],
            env=cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
    weights = {(tmp_path / f"r{i}" / "model.safetensors").read_bytes() for i in range(3)}
    assert len(weights) == 1
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    fc = FeatureCache(cache, folder.name)  # opening cleans what no row refers to
    referenced = {s for (s,) in fc._db.execute("SELECT DISTINCT shard FROM features")}
    present = {p.name for p in (folder / "shards").glob("*.npy")}
    assert present == referenced and all(fc.verify(s) for s in present)
    fc.close()
