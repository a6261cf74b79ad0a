"""Safe loading (no code-carrying pickles), NaN/inf stops the run, and determinism."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from headstart.core.errors import DataError, TrainingDiverged, WeightsError
from headstart.core.files import CHECKPOINT
from headstart.inference.predictor import load
from headstart.models.weights import load_state_dict_file
from headstart.training.checkpoint import load_checkpoint, save_checkpoint
from headstart.training.run import train

from conftest import ROOT, TINY, make_class_tree, run_cli

RUN_MODULE = sys.modules["headstart.training.run"]
SETUP_MODULE = sys.modules["headstart.training.setup"]


class Evil:
    """Unpickling this would run code: it writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def evil_file(tmp_path: Path, name: str) -> tuple[Path, Path]:
    marker = tmp_path / "marker"
    path = tmp_path / name
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": Evil(marker)}, path)
    # sanity: the payload is live, an unsafe load would run it
    assert "write_text" in path.read_bytes().decode("latin1")
    return path, marker


def test_every_torch_load_is_weights_only():
    for py in (ROOT / "src").rglob("*.py"):
        for call in re.findall(r"torch\.load\([^)]*\)", py.read_text()):
            assert "weights_only=True" in call, f"{py}: {call}"


def test_malicious_pickle_refused_as_weights(tmp_path):
    path, marker = evil_file(tmp_path, "evil.pth")
    with pytest.raises(WeightsError, match=r"evil\.pth.*refused") as e:
        load_state_dict_file(path)
    assert not marker.exists()
    assert "weights_only=False" not in str(e.value) and "can still be loaded" not in str(e.value)


def test_malicious_pickle_refused_as_checkpoint(tmp_path):
    path, marker = evil_file(tmp_path, CHECKPOINT)
    with pytest.raises(DataError, match=re.escape(str(path))) as e:
        load_checkpoint(path)
    assert not marker.exists()
    assert "weights_only=False" not in str(e.value) and "can still be loaded" not in str(e.value)


def test_malicious_weights_via_cli_is_exit_2(tmp_path, tiny_split):
    path, marker = evil_file(tmp_path, "evil.pth")
    r = run_cli(
        "train",
        "--strategy",
        "extract",
        tiny_split,
        "-o",
        tmp_path / "run",
        "--backbone",
        TINY,
        "--weights",
        path,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr and "evil.pth" in r.stderr
    assert not marker.exists()


def test_checkpoint_refuses_non_finite_weights(tmp_path):
    with pytest.raises(TrainingDiverged, match="'w'"):
        save_checkpoint(tmp_path / CHECKPOINT, {"model": {"w": torch.tensor([1.0, float("nan")])}})
    assert not (tmp_path / CHECKPOINT).exists()


def test_nan_loss_stops_within_one_step_and_names_the_batch(tiny_split, tmp_path, monkeypatch):
    """A NaN injected at step 3 stops the run at step 3: no update from it, nothing saved as a model."""
    real = SETUP_MODULE.make_loss
    calls = []

    def poisoned(*a, **k):
        fn = real(*a, **k)
        forward = fn.forward

        def maybe_nan(logits, y):
            calls.append(1)
            loss = forward(logits, y)
            return loss * float("nan") if len(calls) == 3 else loss

        fn.forward = maybe_nan
        return fn

    monkeypatch.setattr(SETUP_MODULE, "make_loss", poisoned)
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as e:
        train(
            tiny_split,
            output=run,
            backbone=TINY,
            weights="none",
            strategy="finetune",
            epochs=2,
            batch_size=4,
            num_workers=0,
            checkpoint_every=1,
        )
    assert len(calls) == 3, "stopped at the first non-finite loss"
    files = re.findall(r"(/\S+?\.png)", str(e.value))
    assert len(files) == 4 and all(Path(f).is_file() and str(tiny_split) in f for f in files)
    assert not (run / "model.safetensors").exists() and not (run / "results.json").exists()
    ck = load_checkpoint(run / CHECKPOINT)  # the last good step, finite
    assert ck["totals"]["batches"] == 2
    assert all(torch.isfinite(t).all() for t in ck["model"].values() if t.is_floating_point())


@pytest.mark.parametrize("lr", ["1e30", "1e38"])  # NaN loss; optimizer overflow
def test_huge_lr_diverges_with_exit_3_and_no_saved_model(tiny_split, tmp_path, lr):
    run = tmp_path / "run"
    r = run_cli(
        "train",
        tiny_split,
        "-o",
        run,
        "--backbone",
        TINY,
        "--weights",
        "none",
        "--strategy",
        "finetune",
        "--lr",
        lr,
        "--epochs",
        "3",
        "--workers",
        "0",
    )
    assert r.returncode == 3, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "Lower --lr" in r.stderr
    if lr == "1e30":
        assert "The loss became nan" in r.stderr and "Files in the batch:" in r.stderr
    assert not (run / "model.safetensors").exists()


@pytest.mark.slow
def test_same_seed_same_weights_with_0_and_2_workers(tmp_path):
    data = tmp_path / "data"
    make_class_tree(data / "train", per_class=10)
    make_class_tree(data / "val", per_class=4, seed=500)
    # augmentation (random crops, flips) and dropout both draw random numbers
    opts = dict(
        backbone=TINY,
        weights="none",
        strategy="finetune",
        epochs=2,
        lr=0.05,
        batch_size=4,
        seed=7,
        dropout=0.3,
    )
    runs = [train(data, output=tmp_path / f"r{i}", num_workers=w, **opts) for i, w in enumerate((0, 2, 0))]
    weights = [(r.run_dir / "model.safetensors").read_bytes() for r in runs]
    assert weights[0] == weights[1] == weights[2]
    metrics = [[{k: v for k, v in m.items() if k != "seconds"} for m in r.metrics] for r in runs]
    assert metrics[0] == metrics[1] == metrics[2]
    # and training did something: weights differ from a run with another seed
    other = train(data, output=tmp_path / "other", num_workers=0, **(opts | {"seed": 8}))
    a, b = (
        load_file(str(runs[0].run_dir / "model.safetensors")),
        load_file(str(other.run_dir / "model.safetensors")),
    )
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_deterministic_flag_turns_on_torch_deterministic_algorithms(tiny_split, tmp_path, monkeypatch):
    seen = []

    class Seen(Exception):
        pass

    def setup_run(cfg, strategy, resume, **kw):
        seen.append(torch.are_deterministic_algorithms_enabled())
        raise Seen

    monkeypatch.setattr(RUN_MODULE, "setup_run", setup_run)
    before = torch.are_deterministic_algorithms_enabled()
    with pytest.raises(Seen):
        train(tiny_split, strategy="extract", output=tmp_path / "a", deterministic=True)
    with pytest.raises(Seen):
        train(tiny_split, strategy="extract", output=tmp_path / "b")
    assert seen == [True, before] and torch.are_deterministic_algorithms_enabled() == before


@pytest.fixture
def tiny_run(tiny_split, tmp_path):
    train(
        tiny_split,
        strategy="extract",
        output=tmp_path / "run",
        backbone=TINY,
        weights="none",
        epochs=1,
        batch_size=8,
        num_workers=0,
    )
    return tmp_path / "run"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.update(temperature=0), r"temperature must be a positive finite number .*; found 0"),
        (lambda m: m.update(temperature=-1), r"temperature must be a positive finite number .*; found -1"),
        (lambda m: m.update(temperature="hot"), "temperature must be .*; found 'hot'"),
        (lambda m: m.pop("head"), "head.kind must be one of linear, mlp, binary; found nothing"),
        (
            lambda m: m["preprocessing"].update(std=[0.5, 0, 0.5]),
            "preprocessing.std must be 3 numbers above 0",
        ),
        (lambda m: m["backbone"].update(arch="no_such_net"), "backbone.arch 'no_such_net' .*cannot be built"),
        (lambda m: m.update(classes=["a", "b", "c"]), r"head.*weights \(2, .*model.json implies \(3, "),
        (lambda m: m.update(classes=["a", "a"]), "classes must be a list of at least 2 distinct class names"),
    ],
)
def test_tampered_model_json_is_one_paragraph_naming_the_key(tiny_run, change, message):
    import json

    path = tiny_run / "model.json"
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))
    with pytest.raises(DataError, match=message) as e:
        load(tiny_run)
    assert "model.json" in str(e.value)
    r = run_cli("predict", tiny_run, str(tiny_run / "model.json"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "model.json" in r.stderr
