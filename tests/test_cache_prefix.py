"""finetune --cache-prefix: the split is exact, runs save a normal model, the cache is reused."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import headstart
from headstart.core.errors import ConfigError
from headstart.core.files import CHECKPOINT
from headstart.features.prefix import split_model
from headstart.models.backbones import Backbone, create_backbone
from headstart.models.config import BackboneConfig
from headstart.models.freezing import unfreeze_last
from headstart.models.heads import HeadSpec
from headstart.models.transfer import TransferModel
from headstart.training.checkpoint import load_checkpoint
from headstart.training.run import resume, train
from headstart.training.setup import seed_everything

from conftest import TINY, run_cli

FAST = dict(
    backbone=TINY,
    weights="none",
    strategy="finetune",
    cache_prefix=True,
    lr=0.05,
    batch_size=8,
    num_workers=0,
)


def finetune_model(backbone: Backbone, unfreeze: int = 2, patterns=()) -> TransferModel:
    model = TransferModel.build(backbone, HeadSpec.parse("linear"), ["a", "b"])
    unfreeze_last(model, unfreeze, patterns)
    return model


@pytest.mark.parametrize(
    ("name", "unfreeze", "at", "shape"),
    [
        (TINY, 2, "body.blocks.3.0", (32, 20, 20)),
        (TINY, 5, "body.blocks.0.0", (24, 80, 80)),
        pytest.param("efficientnet_lite0", 2, "body.blocks.5.0", (112, 14, 14), marks=pytest.mark.slow),
        ("tv:resnet18", 1, "body.layer4.0", (256, 14, 14)),  # a chain too, with flatten before fc
    ],
)
def test_prefix_then_suffix_equals_the_backbone(name, unfreeze, at, shape):
    backbone = create_backbone(name, weights="none")
    model = finetune_model(backbone, unfreeze)
    size = backbone.config.input_size
    sp = split_model(model, input_size=size)
    assert (sp.at, sp.shape) == (at, shape)
    x = torch.randn(3, 3, size, size)
    model.eval()
    with torch.inference_mode():
        maps = sp.prefix(x)
        assert maps.shape == (3, int(np.prod(shape)))
        assert torch.allclose(sp.suffix.features(maps.view(3, *shape)), backbone(x), rtol=1e-4, atol=1e-5)
        assert torch.allclose(sp.suffix(maps.view(3, *shape)), model(x), rtol=1e-4, atol=1e-5)
    # every trainable tensor is in the suffix, nothing trainable in the prefix
    assert not any(p.requires_grad for p in sp.prefix.parameters())
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in sp.suffix.parameters() if p.requires_grad}


def test_run_trains_the_suffix_saves_a_normal_model_and_reuses_the_cache(tiny_split, tmp_path):
    cache = tmp_path / "cache"
    r1 = train(tiny_split, output=tmp_path / "a", epochs=3, cache_dir=str(cache), **FAST)
    res = r1.results.to_dict()
    assert res["cache_prefix"] is True and res["prefix_split"] == "body.blocks.3.0"
    assert res["prefix_map_shape"] == [32, 20, 20]
    assert (res["cache_hit_rate"], res["features_extracted"], res["features_from_cache"]) == (0.0, 34, 0)
    assert res["extract_seconds"] > 0 and res["train_loop_seconds"] > 0
    assert res["frozen_tensors_changed"] == 0 and res["frozen_tensors_checked"] > 20
    assert res["trainable_tensors_changed"] == res["trainable_tensors_checked"] > 20
    assert res["val_accuracy"] == 1.0
    # the saved model is the full TransferModel: prefix weights as initialised, suffix trained
    seed_everything(0)  # the run seeds 0 before building its model
    init = finetune_model(create_backbone(TINY, weights="none"))
    saved = load_file(str(tmp_path / "a" / "model.safetensors"))
    ref = init.state_dict()
    assert torch.equal(
        saved["backbone.body.blocks.2.0.conv_exp.weight"], ref["backbone.body.blocks.2.0.conv_exp.weight"]
    )
    assert not torch.equal(
        saved["backbone.body.blocks.3.0.conv_pw.weight"], ref["backbone.body.blocks.3.0.conv_pw.weight"]
    )
    files = sorted(str(p) for p in (tiny_split / "val").rglob("*.png"))
    preds = headstart.load(tmp_path / "a").predict(files)
    assert [p.label for p in preds] == [Path(f).parent.name for f in files]
    # second run: every map from the cache, the same training
    r2 = train(tiny_split, output=tmp_path / "b", epochs=3, cache_dir=str(cache), **FAST)
    assert (r2["cache_hit_rate"], r2["features_extracted"], r2["features_from_cache"]) == (1.0, 0, 34)
    assert r2.metrics == [dict(m, seconds=n["seconds"]) for m, n in zip(r1.metrics, r2.metrics, strict=True)]
    # the prefix maps live in their own cache folder (split point and shape are part of the key)
    specs = [p.read_text() for p in cache.glob("*/spec.json")]
    assert len(specs) == 1 and '"prefix_split": "body.blocks.3.0"' in specs[0]


def test_cache_views_serve_augmented_maps_per_epoch_and_are_cached(tiny_split, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    r = train(tiny_split, output=tmp_path / "a", epochs=3, cache_dir=cache, cache_views=3, **FAST)
    # 24 train + 10 val un-augmented maps, then 2 augmented views of the 24 training images
    assert (r["features_extracted"], r["features_from_cache"], r["cache_views"]) == (34 + 48, 0, 3)
    plain = train(tiny_split, output=tmp_path / "p", epochs=3, cache_dir=cache, **FAST)
    assert plain["features_from_cache"] == 34 and plain.metrics[0]["train_loss"] != r.metrics[0]["train_loss"]
    again = train(tiny_split, output=tmp_path / "b", epochs=3, cache_dir=cache, cache_views=3, **FAST)
    assert (again["features_extracted"], again["features_from_cache"]) == (0, 82)
    same = [dict(m, seconds=n["seconds"]) for m, n in zip(r.metrics, again.metrics, strict=True)]
    assert again.metrics == same

    # each epoch picks one of the three maps of every image: another epoch, other maps
    from headstart.features import prefix as P

    seen = {}
    real = P.CachedMaps.take

    def spy(self, rows):
        if self.views:
            seen.setdefault(self.epoch, []).append(real(self, rows).clone())
        return real(self, rows)

    monkeypatch.setattr(P.CachedMaps, "take", spy)
    train(tiny_split, output=tmp_path / "c", epochs=2, cache_dir=cache, cache_views=3, hflip=False, **FAST)
    first, second = (torch.cat(seen[e]).sum(0) for e in sorted(seen))
    assert len(seen) == 2 and not torch.equal(first, second)


def test_no_cache_uses_a_temporary_cache(tiny_split, tmp_path):
    before = set(Path(os.environ["HEADSTART_CACHE"]).glob("*"))
    r = train(tiny_split, output=tmp_path / "run", epochs=1, cache=False, **FAST)
    assert r["features_extracted"] == 34 and r["frozen_tensors_changed"] == 0
    assert set(Path(os.environ["HEADSTART_CACHE"]).glob("*")) == before


def test_interrupted_run_resumes_bit_identically(tiny_split, tmp_path, monkeypatch):
    """A crash at a checkpoint save, then resume: same weights and metrics as an uninterrupted run."""
    import headstart.core.files as runs

    real_replace, calls = os.replace, []

    def flaky_replace(src, dst):
        if Path(dst).name == CHECKPOINT:
            calls.append(dst)
            if len(calls) == 4:  # saves: step 2, end of epoch 1, step 4, step 6 (fails)
                raise OSError("simulated crash while saving")
        return real_replace(src, dst)

    opts = dict(FAST, epochs=2, checkpoint_every=2, cache_dir=str(tmp_path / "cache"))
    monkeypatch.setattr(runs.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="simulated crash"):
        train(tiny_split, output=tmp_path / "run", **opts)
    ck = load_checkpoint(tmp_path / "run" / CHECKPOINT)
    assert (ck["epoch"], ck["totals"]["batches"]) == (2, 1)  # resumes mid-epoch
    monkeypatch.setattr(runs.os, "replace", real_replace)
    resumed = resume(tmp_path / "run")
    reference = train(tiny_split, output=tmp_path / "ref", **opts)
    assert resumed["resumes"] == 1
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == (
        tmp_path / "ref" / "model.safetensors"
    ).read_bytes()
    assert [dict(m, seconds=0) for m in resumed.metrics] == [dict(m, seconds=0) for m in reference.metrics]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(strategy="extract"), "only with --strategy finetune"),
        (dict(strategy="full"), "only with --strategy finetune"),
        (dict(unfreeze=6), "nothing frozen is left to cache"),  # all 6 groups, the stem included
        (dict(unfreeze=1, unfreeze_patterns=("conv_stem",)), "first module 'conv_stem' trains"),
    ],
)
def test_combinations_that_cannot_split_are_clear_errors(tiny_split, tmp_path, options, message):
    with pytest.raises(ConfigError, match=message) as e:
        train(tiny_split, output=tmp_path / "run", epochs=1, **dict(FAST, **options))
    assert "--cache-prefix" in str(e.value)


class _Residual(nn.Module):
    """Not a chain: forward adds a skip connection around its children."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.mid = nn.Conv2d(3, 3, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(x + self.mid(self.conv(x))).flatten(1)


def test_a_backbone_that_is_not_a_chain_is_refused_naming_it():
    cfg = BackboneConfig(name="custom", source="timm", arch="custom", input_size=32, feature_dim=3)
    backbone = Backbone(_Residual(), cfg, [["body.conv"], ["body.mid"]])
    model = finetune_model(backbone, unfreeze=1)
    with pytest.raises(ConfigError, match="'custom'.*not a sequential chain.*without --cache-prefix"):
        split_model(model, input_size=32)
    vit = finetune_model(create_backbone("timm:vit_tiny_patch16_224", weights="none"), unfreeze=1)
    with pytest.raises(ConfigError, match="tensors of its own"):
        split_model(vit, input_size=224)


def test_cli_flag_and_its_error(tiny_split, tmp_path):
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
        "none",
        "--cache-prefix",
    )
    assert r.returncode == 2
    assert "--cache-prefix works only with --strategy finetune (got 'extract')" in r.stderr
    assert "Traceback" not in r.stderr
