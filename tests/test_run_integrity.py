"""Run folders trust nothing and lose nothing: status, overwrite, full and read-only disks, dead
workers, hostile values, CSV injection, and SIGKILL at random points (issue 13)."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

import headstart
from headstart.core.errors import ConfigError, DataError, RunInterrupted
from headstart.core.files import CHECKPOINT, UMASK
from headstart.features.cache import FeatureCache
from headstart.insight.report import build_report
from headstart.training.run import resume, train

from conftest import TINY, cli_env, make_class_tree, make_image, run_cli

FAST = dict(strategy="extract", backbone=TINY, weights="none", epochs=2, lr=0.05, batch_size=8, num_workers=0)
CLI = [
    "--strategy",
    "extract",
    "--backbone",
    TINY,
    "--weights",
    "none",
    "--epochs",
    "2",
    "--lr",
    "0.05",
    "--batch-size",
    "8",
]


def _mount(path: Path, *options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )


@pytest.fixture
def mounts():
    made = []

    def mount(path: Path, *options: str) -> Path:
        if not _mount(path, *options):
            pytest.skip("cannot mount a tmpfs here (not root)")
        made.append(path)
        return path

    yield mount
    for p in reversed(made):
        subprocess.run(["umount", "-l", str(p)], capture_output=True)


# ----------------------------------------------------------------------------- status and overwrite


def test_status_says_what_state_a_run_is_in_and_readers_check_it(tiny_split, tmp_path):
    r = train(tiny_split, output=tmp_path / "ok", **FAST)
    assert json.loads((r.run_dir / "status.json").read_text())["state"] == "finished"
    with pytest.raises(headstart.WeightsError):  # a failure after the folder was made: failed, and said so
        train(
            tiny_split,
            output=tmp_path / "bad",
            **(FAST | {"backbone": "timm:resnet18", "weights": "nope.pth"}),
        )
    status = json.loads((tmp_path / "bad" / "status.json").read_text())
    assert status["state"] == "failed" and "nope.pth" in status["detail"]
    r = run_cli("predict", tmp_path / "bad", next(tiny_split.rglob("*.png")))
    assert r.returncode == 2 and "does not hold a finished run" in r.stderr and "'failed'" in r.stderr
    # the same command, fixed, may reuse a folder whose run never started training
    assert train(tiny_split, output=tmp_path / "bad", **FAST).results.val_accuracy is not None


def test_an_interrupted_overwrite_never_mixes_two_runs_and_resumes(tiny_split, tmp_path):
    out = tmp_path / "run"
    old = train(tiny_split, output=out, **FAST)
    old_weights = (out / "model.safetensors").read_bytes()
    cmd = [
        sys.executable,
        "-m",
        "headstart",
        "train",
        str(tiny_split),
        "-o",
        str(out),
        *CLI,
        "--strategy",
        "finetune",
        "--epochs",
        "30",
        "--workers",
        "0",
        "--checkpoint-every",
        "1",
        "--overwrite",
    ]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
    t0 = time.monotonic()
    while not (out / CHECKPOINT).exists() and p.poll() is None and time.monotonic() - t0 < 120:
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and f"headstart train --resume {out}" in err, err[-2000:]
    assert not (out / "results.json").exists() and not (out / "model.safetensors").exists()  # nothing old
    assert json.loads((out / "status.json").read_text())["state"] == "stopped"
    aside = list(tmp_path.glob("run.replaced-*"))
    assert len(aside) == 1 and (aside[0] / "model.safetensors").read_bytes() == old_weights  # kept
    r = run_cli("report", out)
    assert r.returncode == 2 and "does not hold a finished run" in r.stderr
    done = resume(out)  # the stop message's advice works
    assert done.results.epochs_run == 30 and not list(tmp_path.glob("run.replaced-*"))  # replaced: gone
    assert old.results.strategy == "extract" and done.results.strategy == "finetune"


# ----------------------------------------------------------------------------- disks and folders


def test_output_that_is_a_file_or_read_only_fails_before_any_work(tiny_split, tmp_path, mounts):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        train(tiny_split, output=tmp_path / "afile", **FAST)
    ro = mounts(tmp_path / "ro", "ro", "size=1m")
    r = run_cli("train", tiny_split, "-o", ro / "run", *CLI, "--workers", "0")
    assert r.returncode == 2 and "cannot be created" in r.stderr and "Traceback" not in r.stderr
    run = train(tiny_split, output=tmp_path / "ok", **FAST).run_dir
    r = run_cli("predict", run, tiny_split, "--csv", ro / "p.csv")
    assert r.returncode == 2 and "--csv" in r.stderr and "cannot be written" in r.stderr
    r = run_cli("predict", run, tiny_split, "--csv", tmp_path / "new" / "dir" / "p.csv")  # a missing folder
    assert r.returncode == 0 and (tmp_path / "new" / "dir" / "p.csv").exists()


def test_a_full_disk_while_saving_keeps_the_checkpoint_and_resume_finishes(tiny_split, tmp_path, mounts):
    """extract: the checkpoint holds the head only, the saved model the whole network."""
    disk = mounts(tmp_path / "disk", "size=8m")
    reference = train(tiny_split, output=tmp_path / "ref", **FAST)
    assert (reference.run_dir / "model.safetensors").stat().st_size > 200_000
    filler = disk / "filler"
    filler.write_bytes(b"\0" * (8 * 1024 * 1024 - 96 * 1024))  # room for everything but the model
    r = run_cli("train", tiny_split, "-o", disk / "run", *CLI, "--workers", "0")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "No space left" in r.stderr and "model.safetensors" in r.stderr and "--resume" in r.stderr
    assert (disk / "run" / CHECKPOINT).exists() and not (disk / "run" / "model.safetensors").exists()
    assert json.loads((disk / "run" / "status.json").read_text())["state"] == "stopped"
    filler.unlink()
    r = run_cli("train", "--resume", disk / "run")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (disk / "run" / "model.safetensors").read_bytes() == (
        reference.run_dir / "model.safetensors"
    ).read_bytes()


# ----------------------------------------------------------------------------- dead workers, signals


def test_a_killed_loader_worker_is_explained_checkpointed_and_resumable(tiny_split, tmp_path, monkeypatch):
    import torch.utils.data

    from headstart.data.loading import ImageDataset

    opts = FAST | {"strategy": "finetune", "epochs": 2, "num_workers": 1, "checkpoint_every": 1}
    reference = train(tiny_split, output=tmp_path / "ref", **opts)
    real = ImageDataset.__getitem__

    def getitem(self, i):
        info = torch.utils.data.get_worker_info()
        if info is not None and self.epoch == 2 and i % 5 == 0:  # the OOM killer, say, in epoch 2
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, i)

    monkeypatch.setattr(ImageDataset, "__getitem__", getitem)
    with pytest.raises(RunInterrupted) as e:
        train(tiny_split, output=tmp_path / "run", **opts)
    msg = str(e.value)
    assert "data-loading worker process died" in msg and "out-of-memory" in msg
    assert f"headstart train --resume {tmp_path / 'run'}" in msg and "--workers 0" in msg
    monkeypatch.undo()
    done = resume(tmp_path / "run", num_workers=0)  # fewer workers: the same result
    assert done.metrics[-1]["train_loss"] == reference.metrics[-1]["train_loss"]
    weights = [load_file(str(r.run_dir / "model.safetensors")) for r in (done, reference)]
    assert all(weights[0][k].equal(weights[1][k]) for k in weights[1])


@pytest.mark.slow
def test_ctrl_c_is_announced_once_not_once_per_worker(tiny_split, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "headstart",
        "train",
        str(tiny_split),
        "-o",
        str(tmp_path / "run"),
        *CLI,
        "--strategy",
        "finetune",
        "--epochs",
        "50",
        "--workers",
        "2",
        "--checkpoint-every",
        "1",
    ]
    p = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(), start_new_session=True
    )
    t0 = time.monotonic()
    while not (tmp_path / "run" / CHECKPOINT).exists() and time.monotonic() - t0 < 120:
        time.sleep(0.05)
    time.sleep(0.5)  # workers running
    os.killpg(p.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    assert err.count("SIGINT received: finishing this step") == 1, err[-3000:]


# ----------------------------------------------------------------------------- hostile or odd content


def test_hostile_values_in_every_run_file_are_escaped_in_the_report(tiny_split, tmp_path):
    run = train(tiny_split, output=tmp_path / "run", **FAST).run_dir
    evil = "<img src=x onerror=alert(1)>"

    def edit(name: str, change) -> None:
        d = json.loads((run / name).read_text())
        change(d)
        (run / name).write_text(json.dumps(d))

    edit("model.json", lambda m: m.update(classes=[evil, "red"]) or m["backbone"].update(name=evil))
    edit("split.json", lambda s: s.update(classes=[evil, "red"]))
    edit("config.json", lambda c: c["versions"].update(headstart=evil))
    edit("results.json", lambda r: r.update(best_epoch=evil, head=evil, unfrozen_modules=[evil]))
    with open(run / "metrics.csv", "a") as f:
        f.write("oops,not,a,number,row,,\n")  # a non-numeric row must not crash the report
    page = build_report(run, device="cpu", num_workers=0).read_text()
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page


def test_csv_cells_that_spreadsheets_would_run_are_escaped_and_resume_parses_quotes(tmp_path):
    data = tmp_path / "data"
    make_class_tree(data, per_class=6)
    (data / "red").rename(data / "=HYPERLINK(1)")  # a class name a spreadsheet would run
    make_image(data / "green" / "line\nbreak.png", (30, 200, 40))
    run = train(data, output=tmp_path / "run", **FAST).run_dir
    out = tmp_path / "p.csv"
    assert run_cli("predict", run, data, "--csv", out, "--top-k", "2").returncode == 0
    with open(out, newline="") as f:
        rows = list(csv.reader(f))
    assert len(rows) == 1 + 13
    labels = {cell for r in rows[1:] for cell in (r[1], r[3])}
    assert labels == {"'=HYPERLINK(1)", "green"}
    assert "line\nbreak.png" in {Path(r[0]).name for r in rows[1:]}
    r = run_cli("predict", run, data, "--csv", out, "--top-k", "2", "--resume")
    assert r.returncode == 0 and "skipped 13 already in the CSV" in r.stdout
    with open(out, newline="") as f:
        assert len(list(csv.reader(f))) == 1 + 13  # nothing written twice


def test_small_promises(tmp_path, tiny_split):
    # predict on a folder without images says so and fails
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    run = train(tiny_split, output=tmp_path / "run", **FAST).run_dir
    r = run_cli("predict", run, tmp_path / "empty")
    assert r.returncode == 2 and "No image files" in r.stderr and "notes.txt" in r.stderr
    # run files follow the umask like the figures do
    mode = (run / "results.json").stat().st_mode & 0o777
    assert mode == 0o666 & ~UMASK == (run / "model.safetensors").stat().st_mode & 0o777
    # a folder symlinked inside a class folder is listed, not silently skipped
    (tiny_split / "train" / "red" / "more").symlink_to(tmp_path / "empty")
    split = headstart.train(tiny_split, output=tmp_path / "r2", **FAST).results.skipped_files
    assert any(s["path"].endswith("red/more") and "symbolic link" in s["reason"] for s in split)


def test_bad_fraction_points_the_doctor_at_the_dataset_in_a_single_tree(tmp_path):
    data = tmp_path / "tree"
    make_class_tree(data, per_class=20)
    for p in sorted(data.rglob("*.png"))[::3]:
        p.write_text("not an image")
    with pytest.raises(DataError, match=rf"headstart doctor {data}`"):
        train(data, output=tmp_path / "run", **FAST)


def test_features_extracted_counts_only_images_the_backbone_saw(tiny_split, tmp_path):
    (tiny_split / "train" / "red" / "broken.png").write_text("not an image")
    r = train(tiny_split, output=tmp_path / "run", max_bad_fraction=0.5, **FAST)
    assert r.results.features_extracted == 34 and len(r.results.skipped_files) == 1


# ----------------------------------------------------------------------------- SIGKILL anywhere


@pytest.mark.slow
def test_sigkill_at_random_points_then_rerun_or_resume_gives_the_uninterrupted_result(tmp_path):
    """20 kills during extraction, checkpointing and saving; after each the next command finishes with
    exactly the reference result, and the shared cache verifies clean."""
    data = tmp_path / "data"
    make_class_tree(data / "train", per_class=16)
    make_class_tree(data / "val", per_class=6, seed=500)
    cache = tmp_path / "cache"
    args = [*CLI, "--workers", "0", "--epochs", "6", "--checkpoint-every", "1", "--cache-dir", str(cache)]
    ref = tmp_path / "ref"
    assert run_cli("train", data, "-o", ref, *args, "--cache-dir", str(tmp_path / "refcache")).returncode == 0
    t0 = time.monotonic()
    assert (
        run_cli(
            "train", data, "-o", tmp_path / "timing", *args, "--cache-dir", str(tmp_path / "c2")
        ).returncode
        == 0
    )
    duration = time.monotonic() - t0
    rng = random.Random(0)
    for i in range(20):
        out = tmp_path / f"run{i}"
        p = subprocess.Popen(
            [sys.executable, "-m", "headstart", "train", str(data), "-o", str(out), *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=cli_env(),
        )
        time.sleep(rng.uniform(0.3, duration))
        p.kill()
        p.wait()
        state = (
            json.loads((out / "status.json").read_text()).get("state")
            if (out / "status.json").exists()
            else None
        )
        if state == "finished":  # it finished before the kill
            pass
        elif (out / CHECKPOINT).exists():
            r = run_cli("train", "--resume", out)
            assert r.returncode == 0, (i, r.stderr[-2000:])
        else:
            r = run_cli("train", data, "-o", out, *args)
            assert r.returncode == 0, (i, r.stderr[-2000:])
        assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes(), i
    time.sleep(2.5)  # temporaries of the last killed writer are old enough to judge
    for folder in cache.iterdir():
        fc = FeatureCache(cache, folder.name)
        shards = [s.name for s in (folder / "shards").glob("*.npy")]
        assert all(fc.verify(s) for s in shards) and not list((folder / "shards").glob(".*.tmp"))
        assert not list(folder.glob("quarantine/*"))
        fc.close()
