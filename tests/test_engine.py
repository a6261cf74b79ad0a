"""The frozen engine: PyTorch or ONNX Runtime, chosen by rule, checked for parity, kept in the cache key."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from headstart.core.errors import ConfigError
from headstart.data.transforms import Preprocess, eval_transform
from headstart.features import engine as eng
from headstart.features.engine import EngineChoice, choose_engine
from headstart.training.run import train

from conftest import TINY, make_image

pytest.importorskip("onnxruntime", reason="pip install 'headstart[onnx]'")
pytest.importorskip("onnxscript", reason="pip install 'headstart[onnx]'")

CPU = torch.device("cpu")
FAST = dict(backbone=TINY, weights="none", strategy="extract", epochs=3, batch_size=8, num_workers=0)


def test_choice_follows_the_rule(monkeypatch):
    assert choose_engine("torch", CPU, 10**6).name == "torch"
    assert choose_engine("auto", CPU, 10**6).name == "onnxruntime"
    small = choose_engine("auto", CPU, eng.MIN_IMAGES_FOR_ORT - 1)
    assert small.name == "torch" and "cost more than it saves" in small.note
    assert choose_engine("auto", CPU, 10**6, compile=True).name == "torch"
    assert choose_engine("onnxruntime", CPU, 5) == EngineChoice("onnxruntime", strict=True, note="asked for")
    gpu = torch.device("cuda")
    assert choose_engine("auto", gpu, 10**6).name == "torch"
    with pytest.raises(ConfigError, match="runs on the CPU"):
        choose_engine("onnxruntime", gpu, 10**6)
    monkeypatch.setattr(eng, "_missing_ort", lambda: "onnxruntime")
    assert "not installed" in choose_engine("auto", CPU, 10**6).note
    with pytest.raises(ConfigError, match="pip install 'headstart\\[onnx\\]'"):
        choose_engine("onnxruntime", CPU, 10**6)


def test_uint8_transform_matches_the_float_one(tmp_path):
    make_image(tmp_path / "a.png", (200, 30, 90), size=50)
    from PIL import Image

    pp = Preprocess(32, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    img = Image.open(tmp_path / "a.png").convert("RGB")
    u8 = eval_transform(pp, uint8=True)(img)
    assert u8.dtype == torch.uint8 and u8.shape == (3, 32, 32)
    mean, std = torch.tensor(pp.mean).view(3, 1, 1), torch.tensor(pp.std).view(3, 1, 1)
    torch.testing.assert_close((u8.float() / 255 - mean) / std, eval_transform(pp)(img), atol=1e-5, rtol=0)


def test_onnxruntime_features_match_torch_and_key_their_own_cache(tiny_split, tmp_path):
    cache = str(tmp_path / "cache")
    ort = train(tiny_split, output=tmp_path / "ort", frozen_engine="onnxruntime", cache_dir=cache, **FAST)
    rec = ort["frozen_engine"]
    assert rec["name"] == "onnxruntime" and rec["parity_images"] > 0
    assert rec["parity_max_abs_diff"] <= eng.PARITY_RTOL * max(rec["parity_scale"], 1.0)
    assert len(list((tmp_path / "cache" / "engines").glob("*.onnx"))) == 1
    # PyTorch rows live under another key: nothing is read from the ONNX Runtime rows
    pt = train(tiny_split, output=tmp_path / "pt", frozen_engine="torch", cache_dir=cache, **FAST)
    assert pt["frozen_engine"]["name"] == "torch" and pt["features_from_cache"] == 0
    assert pt["features_extracted"] == ort["features_extracted"] == 34
    # the same training on features equal within float16 storage
    assert pt["val_accuracy"] == ort["val_accuracy"]
    np.testing.assert_allclose(pt.metrics[-1]["train_loss"], ort.metrics[-1]["train_loss"], atol=2e-3)
    again = train(tiny_split, output=tmp_path / "again", frozen_engine="onnxruntime", cache_dir=cache, **FAST)
    assert (again["features_from_cache"], again["frozen_engine"]["name"]) == (34, "onnxruntime")
    # auto, on too few images to pay for an export, still takes the engine exported before
    auto = train(tiny_split, output=tmp_path / "auto", cache_dir=cache, **FAST)
    assert (auto["features_from_cache"], auto["frozen_engine"]["name"]) == (34, "onnxruntime")
    assert train(tiny_split, output=tmp_path / "fresh", cache_dir=str(tmp_path / "other"),
                 **FAST)["frozen_engine"]["name"] == "torch"  # fmt: skip


def test_a_disagreeing_engine_falls_back_to_torch_or_fails_when_asked_for(tiny_split, tmp_path, monkeypatch):
    monkeypatch.setattr(eng, "PARITY_RTOL", -1.0)  # no difference passes
    monkeypatch.setattr(eng, "MIN_IMAGES_FOR_ORT", 0)
    r = train(tiny_split, output=tmp_path / "auto", cache_dir=str(tmp_path / "c"), **FAST)
    assert r["frozen_engine"]["name"] == "torch"
    assert "disagrees with PyTorch" in r["frozen_engine"]["note"]
    with pytest.raises(ConfigError, match="disagrees with PyTorch"):
        train(tiny_split, output=tmp_path / "strict", frozen_engine="onnxruntime",
              cache_dir=str(tmp_path / "c2"), **FAST)  # fmt: skip


def test_a_damaged_engine_file_falls_back_and_goes(tiny_split, tmp_path):
    import shutil

    cache = tmp_path / "cache"
    train(tiny_split, output=tmp_path / "a", frozen_engine="onnxruntime", cache_dir=str(cache), **FAST)
    (engine_file,) = (cache / "engines").glob("*.onnx")
    engine_file.write_bytes(b"not a model")
    for d in cache.iterdir():  # keep the engine, drop the rows: the next run must compute
        if d.is_dir() and d.name != "engines":
            shutil.rmtree(d)
    r = train(tiny_split, output=tmp_path / "b", cache_dir=str(cache), **FAST)  # auto: exported before
    assert r["frozen_engine"]["name"] == "torch" and "could not run" in r["frozen_engine"]["note"]
    assert r["features_extracted"] == 34 and not engine_file.exists()


def test_cached_prefix_maps_on_onnxruntime(tiny_split, tmp_path):
    opts = dict(FAST, strategy="finetune", cache_prefix=True, unfreeze=1, lr=0.05)
    kw = dict(cache_dir=str(tmp_path / "cache"), **opts)
    ort = train(tiny_split, output=tmp_path / "ort", frozen_engine="onnxruntime", **kw)
    pt = train(tiny_split, output=tmp_path / "pt", frozen_engine="torch", **kw)
    assert ort["frozen_engine"]["name"] == "onnxruntime" and pt["frozen_engine"]["name"] == "torch"
    assert ort["features_extracted"] == pt["features_extracted"] == 34
    np.testing.assert_allclose(pt.metrics[0]["train_loss"], ort.metrics[0]["train_loss"], atol=2e-3)
