"""Crash-safe runs: SIGKILL + --resume is bit-identical, SIGTERM stops cleanly, saves are atomic."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from headstart.core.errors import ConfigError, DataError
from headstart.core.files import CHECKPOINT
from headstart.training.checkpoint import load_checkpoint
from headstart.training.run import resume, train

from conftest import TINY, cli_env, make_class_tree, run_cli

# finetune: the backbone trains too, so BN statistics, optimizer moments and augmentation all matter
ARGS = [
    "--backbone",
    TINY,
    "--weights",
    "none",
    "--strategy",
    "finetune",
    "--epochs",
    "4",
    "--lr",
    "0.05",
    "--batch-size",
    "4",
    "--seed",
    "3",
]


@pytest.fixture
def data(tmp_path) -> Path:
    make_class_tree(tmp_path / "data" / "train", per_class=11)  # 22 images: drop_last drops 2
    make_class_tree(tmp_path / "data" / "val", per_class=4, seed=500)
    return tmp_path / "data"


def popen_train(data: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "headstart", "train", str(data), "-o", str(out), *ARGS, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> float:
    """Seconds until `path` exists (the first checkpoint), while `proc` runs."""
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {path} appeared: {proc.communicate()[1][-2000:]}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{path} did not appear in {timeout}s")
        time.sleep(0.01)
    return time.monotonic() - t0


def metric_rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert metric_rows(a) == metric_rows(b)


def kill_after_saves(proc: subprocess.Popen, path: Path, saves: int, delay: float) -> int:
    """SIGKILL `proc` `delay` s after it has replaced `path` `saves` times; returns saves seen."""
    seen, last = 0, None
    while seen < saves:
        if proc.poll() is not None:
            raise AssertionError(f"run ended after {seen} checkpoints: {proc.communicate()[1][-2000:]}")
        try:
            ino = path.stat().st_ino  # os.replace gives every save a new inode
        except FileNotFoundError:
            ino = None
        if ino is not None and ino != last:
            seen, last = seen + 1, ino
        time.sleep(0.001)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "2"])
def test_sigkill_at_random_point_then_resume_is_bit_identical(data, tmp_path, workers):
    ref = tmp_path / "ref"
    r = run_cli("train", data, "-o", ref, *ARGS, "--workers", workers)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (ref / CHECKPOINT).exists(), "a finished run removes its checkpoint"

    # 4 epochs x 5 steps, a checkpoint after each step and epoch: ~24 saves. Kill after a random
    # number of them (at most 12, so polling that misses a few still kills mid-run), mid-step.
    killed = tmp_path / "killed"
    saves, delay = random.randint(1, 12), random.uniform(0, 0.05)
    p = popen_train(data, killed, "--workers", workers, "--checkpoint-every", "1")
    kill_after_saves(p, killed / CHECKPOINT, saves, delay)
    assert p.returncode == -signal.SIGKILL, f"run finished before the kill ({saves} saves + {delay:.3f}s)"
    assert not (killed / "results.json").exists()
    stopped_at = load_checkpoint(killed / CHECKPOINT)
    where = f"killed after {saves} saves + {delay:.3f}s: epoch {stopped_at['epoch']} {stopped_at['totals']}"

    r = run_cli("train", "--resume", killed, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    assert_same_run(ref, killed), where


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_and_exits_130(data, tmp_path):
    ref = tmp_path / "ref"
    r = run_cli("train", data, "-o", ref, *ARGS, "--workers", "0")
    assert r.returncode == 0, r.stderr[-3000:]

    run = tmp_path / "run"
    p = popen_train(data, run, "--workers", "0", "--checkpoint-every", "1")
    wait_for(run / CHECKPOINT, p)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-3000:]
    assert "SIGTERM received" in err and f"headstart train --resume {run}" in err
    assert "Traceback" not in err
    ck = load_checkpoint(run / CHECKPOINT)
    assert ck["epoch"] >= 1

    r = run_cli("train", "--resume", run, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(ref, run)
    import json

    assert json.loads((run / "results.json").read_text())["resumes"] == 1


@pytest.mark.parametrize("strategy", ["finetune", "extract"])
def test_kill_during_save_keeps_previous_checkpoint(tiny_split, tmp_path, monkeypatch, strategy):
    """os.replace failing (as a crash mid-save would) leaves the previous checkpoint intact."""
    import headstart.core.files as runs

    run = tmp_path / "run"
    real_replace, calls = os.replace, []

    def flaky_replace(src, dst):
        if Path(dst).name == CHECKPOINT:
            calls.append(dst)
            if len(calls) == 4:
                raise OSError("simulated crash while saving")
        return real_replace(src, dst)

    monkeypatch.setattr(runs.os, "replace", flaky_replace)
    opts = dict(
        backbone=TINY,
        weights="none",
        strategy=strategy,
        epochs=3,
        lr=0.05,
        batch_size=8,
        num_workers=0,
        seed=1,
        dropout=0.2,
    )
    with pytest.raises(OSError, match="simulated crash"):
        train(tiny_split, output=run, checkpoint_every=2, **opts)
    ck = load_checkpoint(run / CHECKPOINT)  # the third save (epoch 2, batch 1), complete
    assert (ck["epoch"], ck["totals"]["batches"]) == (2, 1)
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")], "temp file left behind"

    monkeypatch.setattr(runs.os, "replace", real_replace)
    resumed = resume(run)
    reference = train(tiny_split, output=tmp_path / "ref", checkpoint_every=2, **opts)
    assert resumed.results.resumes == 1
    assert_same_run(reference.run_dir, run)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_damaged_checkpoint_is_a_clear_error_naming_the_file(tiny_split, tmp_path, damage):
    run = tmp_path / "run"
    opts = dict(backbone=TINY, weights="none", strategy="finetune", epochs=1, batch_size=8, num_workers=0)
    train(tiny_split, output=run, checkpoint_every=1, **opts)
    (run / "results.json").unlink()  # pretend it was killed before finishing
    good = run / "good.pt"
    ck = run / CHECKPOINT
    # the finished run removed its checkpoint; make one the way a killed run leaves it
    from headstart.training.checkpoint import save_checkpoint

    save_checkpoint(good, {"model": {"w": torch.zeros(2)}, "epoch": 1})
    blob = good.read_bytes()
    ck.write_bytes({"truncate": blob[: len(blob) // 2], "garbage": os.urandom(4096), "empty": b""}[damage])
    with pytest.raises(DataError) as e:
        resume(run)
    assert str(ck) in str(e.value) and "cannot be read" in str(e.value)
    r = run_cli("train", "--resume", run)
    assert r.returncode == 2 and "Traceback" not in r.stderr and str(ck) in r.stderr


def test_unfinished_run_is_not_silently_restarted(tiny_split, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / CHECKPOINT).write_bytes(b"x")
    with pytest.raises(ConfigError, match="--resume"):
        train(tiny_split, strategy="extract", output=run, backbone=TINY, weights="none", epochs=1)
    done = train(
        tiny_split, strategy="extract", output=tmp_path / "done", backbone=TINY, weights="none", epochs=1
    )
    with pytest.raises(ConfigError, match="finished run"):
        resume(done.run_dir)


@pytest.mark.parametrize(("n", "bs", "drop_last"), [(24, 8, True), (22, 4, True), (10, 3, False)])
def test_resumable_sampler_gives_dataloaders_own_shuffle(n, bs, drop_last):
    """Checkpointing changes no result: the order equals DataLoader(shuffle=True, generator=seeded)."""
    from torch.utils.data import DataLoader

    from headstart.training.checkpoint import ResumableSampler

    g = torch.Generator()
    g.manual_seed(5)
    loader = DataLoader(list(range(n)), batch_size=bs, shuffle=True, generator=g, drop_last=drop_last)
    expected = [[i for b in loader for i in b.tolist()] for _ in range(4)]
    got = [order[: len(expected[k])] for k, order in enumerate(ResumableSampler(n, seed=5).orders(4))]
    assert got == expected
    s = ResumableSampler(n, seed=5)
    s.set_epoch(3, start=bs)
    assert list(s) == got[2][bs:] + ResumableSampler(n, seed=5).order(3)[len(expected[2]) :]
