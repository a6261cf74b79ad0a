"""Fine-tuning on images with the frozen prefix on the fast path: the same training, faster."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from headstart.core.errors import ConfigError
from headstart.features import engine as eng
from headstart.training.run import train
from headstart.training.strategies import inputs

from conftest import TINY

FAST = dict(backbone=TINY, weights="none", strategy="finetune", unfreeze=1, epochs=2, batch_size=8,
            num_workers=0, lr=0.01, seed=3)  # fmt: skip


def _whole_model(monkeypatch):
    """The path before the live prefix: the whole model trains on normalised float images."""
    monkeypatch.setattr(inputs, "live_prefix", lambda *a, **k: None)


def test_the_live_prefix_trains_like_the_whole_model(tiny_split, tmp_path, monkeypatch):
    live = train(tiny_split, output=tmp_path / "live", frozen_engine="torch", **FAST)
    assert live["prefix_split"].startswith("body.") and live["frozen_engine"]["name"] == "torch"
    assert live["frozen_tensors_changed"] == 0 and live["frozen_tensors_checked"] > 0
    _whole_model(monkeypatch)
    whole = train(tiny_split, output=tmp_path / "whole", frozen_engine="torch", **FAST)
    assert whole.results.prefix_split is None and whole.results.frozen_engine is None
    # BatchNorm folded and uint8 input normalised on the device: equal to float rounding
    for a, b in zip(live.metrics, whole.metrics, strict=True):
        np.testing.assert_allclose(a["train_loss"], b["train_loss"], rtol=1e-3, atol=1e-5)
        np.testing.assert_allclose(a["val_loss"], b["val_loss"], rtol=1e-3, atol=1e-5)
    from safetensors.torch import load_file

    wa, wb = (
        load_file(tmp_path / "live" / "model.safetensors"),
        load_file(tmp_path / "whole" / "model.safetensors"),
    )
    assert wa.keys() == wb.keys()
    # Adam turns rounding-level gradient differences near zero into steps of up to lr (0.01); the
    # losses above are the tight check
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=FAST["lr"], msg=lambda m, k=k: f"{k}: {m}")


def test_every_layer_training_leaves_nothing_to_move(tiny_split, tmp_path):
    r = train(tiny_split, output=tmp_path / "full", **dict(FAST, strategy="full"))
    assert r.results.prefix_split is None and r.results.frozen_engine is None


@pytest.mark.parametrize("pattern, first", [(None, "body.blocks"), ("conv_stem", None)])
def test_the_prefix_ends_at_the_first_trainable_module(tiny_split, tmp_path, pattern, first):
    # a pattern that trains the stem leaves nothing frozen in front: the whole model trains as before
    opts = dict(FAST, unfreeze_patterns=[pattern] if pattern else [])
    r = train(tiny_split, output=tmp_path / "r", frozen_engine="torch", **opts)
    split = r.results.prefix_split
    assert split.startswith(first) if first else split is None
    assert r["frozen_tensors_changed"] == 0


def test_the_prefix_runs_on_onnxruntime_checked_against_torch(tiny_split, tmp_path):
    for name in ("onnxruntime", "onnx", "onnxscript"):
        pytest.importorskip(name, reason="pip install 'headstart[onnx]'")
    cache = str(tmp_path / "cache")
    ort = train(tiny_split, output=tmp_path / "ort", frozen_engine="onnxruntime", cache_dir=cache, **FAST)
    rec = ort["frozen_engine"]
    assert rec["name"] == "onnxruntime" and rec["parity_images"] == FAST["batch_size"]
    assert rec["parity_max_abs_diff"] <= eng.PARITY_RTOL * max(rec["parity_scale"], 1.0)
    assert len(list((tmp_path / "cache" / "engines").glob("*.onnx"))) == 1
    pt = train(tiny_split, output=tmp_path / "pt", frozen_engine="torch", cache_dir=cache, **FAST)
    np.testing.assert_allclose(ort.metrics[-1]["train_loss"], pt.metrics[-1]["train_loss"], rtol=1e-3)
    assert ort["frozen_tensors_changed"] == 0
    # auto, on too few images to pay for an export, takes the one exported before
    auto = train(tiny_split, output=tmp_path / "auto", cache_dir=cache, **FAST)
    assert auto["frozen_engine"]["name"] == "onnxruntime"


def test_a_disagreeing_engine_falls_back_to_torch_or_fails_when_asked_for(tiny_split, tmp_path, monkeypatch):
    for name in ("onnxruntime", "onnx", "onnxscript"):
        pytest.importorskip(name, reason="pip install 'headstart[onnx]'")
    monkeypatch.setattr(eng, "PARITY_RTOL", -1.0)  # no difference passes
    monkeypatch.setattr(eng, "MIN_IMAGES_FOR_ORT", 0)
    r = train(tiny_split, output=tmp_path / "auto", cache_dir=str(tmp_path / "c"), **FAST)
    assert r["frozen_engine"]["name"] == "torch" and "disagrees with PyTorch" in r["frozen_engine"]["note"]
    with pytest.raises(ConfigError, match="disagrees with PyTorch"):
        train(tiny_split, output=tmp_path / "strict", frozen_engine="onnxruntime",
              cache_dir=str(tmp_path / "c2"), **FAST)  # fmt: skip


def test_checkpoints_hold_the_models_own_keys():
    """--resume reads checkpoints written with or without the live prefix."""
    from headstart.features.live_prefix import LivePrefix
    from headstart.features.prefix import split_model
    from headstart.models.backbones import create_backbone
    from headstart.models.freezing import unfreeze_last
    from headstart.models.heads import HeadSpec
    from headstart.models.transfer import TransferModel

    model = TransferModel.build(create_backbone(TINY, weights="none"), HeadSpec(), ["a", "b"])
    unfreeze_last(model, 1)
    net = LivePrefix(model, split_model(model, input_size=32), lambda x: x)
    assert net.state_dict().keys() == model.state_dict().keys()
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    net.load_state_dict(state)
    assert all(not v.any() for v in model.state_dict().values())


def test_frozen_blocks_that_act_at_random_keep_the_whole_model(tiny_split, tmp_path, monkeypatch):
    from timm.layers import DropPath
    from torch import nn

    from headstart.features import live_prefix

    assert live_prefix.random_in_training(nn.Sequential(nn.Conv2d(3, 3, 1), nn.Dropout(0.2)))
    assert live_prefix.random_in_training(nn.Sequential(DropPath(0.1)))
    quiet = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Dropout(0.0), DropPath(0.0))
    assert not live_prefix.random_in_training(quiet)
    # stochastic depth in frozen blocks dropped their branches in training: kept as it was
    monkeypatch.setattr(live_prefix, "random_in_training", lambda m: True)
    r = train(tiny_split, output=tmp_path / "r", frozen_engine="torch", **FAST)
    assert r.results.prefix_split is None and r.results.frozen_engine is None
