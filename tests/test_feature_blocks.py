"""--feature-blocks K: pooled outputs of the last blocks concatenated in front of the usual features."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import headstart
from headstart.core.errors import ConfigError
from headstart.models.backbones import backbone_from_config, create_backbone, with_feature_blocks
from headstart.models.fastpath import inference_model

from conftest import TINY, make_class_tree


def _stage_outputs(bb, x):
    """Pooled output of every stage of a timm EfficientNet, computed by hand."""
    body, out = bb.body, {}
    h = body.bn1(body.conv_stem(x))
    for i, stage in enumerate(body.blocks):
        h = stage(h)
        out[f"body.blocks.{i}"] = h.mean(dim=(2, 3))
    return out


def test_features_are_the_last_stage_outputs_pooled_then_the_usual_features():
    torch.manual_seed(0)
    plain = create_backbone(TINY, weights="none").eval()
    multi = with_feature_blocks(plain, 3)
    assert len(multi.taps) == 2 and multi.taps == sorted(multi.taps)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        f, base, stages = multi(x), plain(x), _stage_outputs(plain, x)
    # a tap is a stage, or the only block of a one-block stage: either way the stage's output
    stage_of = {t: ".".join(t.split(".")[:3]) for t in multi.taps}
    assert all(t == s or len(plain.get_submodule(s)) == 1 for t, s in stage_of.items())
    expected = torch.cat([stages[stage_of[t]] for t in multi.taps] + [base], dim=1)
    assert f.shape == (2, multi.feature_dim) == expected.shape
    assert multi.feature_dim > plain.feature_dim
    torch.testing.assert_close(f, expected)
    # the fast path's folded copy taps its own blocks and agrees
    with torch.inference_mode():
        fast = inference_model(multi, torch.device("cpu"))(x)
    assert fast is not None and (fast - f).abs().max() < 1e-3
    # a saved config rebuilds the same taps and width
    again = backbone_from_config(multi.config)
    assert again.taps == multi.taps and again.feature_dim == multi.feature_dim


def test_out_of_range_feature_blocks_names_the_range():
    plain = create_backbone(TINY, weights="none")
    n = len(plain.block_groups())
    with pytest.raises(ConfigError, match=f"up to {n}"):
        with_feature_blocks(plain, n + 1)


def test_feature_blocks_with_cache_prefix_is_refused(tiny_split, tmp_path):
    with pytest.raises(ConfigError, match="--feature-blocks 2"):
        headstart.train(
            str(tiny_split),
            output=str(tmp_path / "r"),
            backbone=TINY,
            weights="none",
            strategy="finetune",
            cache_prefix=True,
            feature_blocks=2,
        )


@pytest.fixture(scope="module")
def multi_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fb")
    make_class_tree(root / "data" / "train", per_class=10)
    make_class_tree(root / "data" / "val", per_class=4, seed=9)
    cache = root / "cache"
    out = root / "run"
    headstart.train(
        str(root / "data"),
        strategy="extract",
        output=str(out),
        backbone=TINY,
        weights="none",
        epochs=20,
        lr=0.05,
        batch_size=8,
        num_workers=0,
        feature_blocks=2,
        cache_dir=str(cache),
    )
    return out, cache


def test_run_saves_the_wider_features_and_predicts_the_same_after_load(multi_run):
    out, cache = multi_run
    record = json.loads((out / "model.json").read_text())
    assert record["backbone"]["feature_blocks"] == 2
    plain_dim = create_backbone(TINY, weights="none").feature_dim
    assert record["backbone"]["feature_dim"] > plain_dim
    p = headstart.load(out, device="cpu")
    assert p.model.head[-1].in_features == record["backbone"]["feature_dim"]
    files = sorted((out.parent / "data" / "val").rglob("*.png"))
    preds = p.predict([str(f) for f in files])
    assert len(preds) == len(files) and all(x.error is None for x in preds)
    results = json.loads((out / "results.json").read_text())
    right = sum(x.label == Path(x.path).parent.name for x in preds)
    assert right / len(files) == pytest.approx(results["val_accuracy"])  # same model after load
    assert results["val_accuracy"] >= 0.75


def test_onnx_export_of_feature_blocks_passes_parity(multi_run, tmp_path):
    pytest.importorskip("onnxruntime")
    from headstart.deploy.export import export

    r = export(multi_run[0], format="onnx", output=tmp_path / "m.onnx")
    assert r.parity.passed and r.parity.top1_agreement == 1.0 and r.parity.max_abs_diff <= 1e-4


def test_feature_blocks_get_their_own_cache_entries(multi_run, tmp_path):
    out, cache = multi_run
    again = headstart.train(
        str(out.parent / "data"),
        strategy="extract",
        output=str(tmp_path / "a"),
        backbone=TINY,
        weights="none",
        epochs=1,
        batch_size=8,
        num_workers=0,
        feature_blocks=2,
        cache_dir=str(cache),
    )
    assert again["cache_hit_rate"] == 1.0
    plain = headstart.train(
        str(out.parent / "data"),
        strategy="extract",
        output=str(tmp_path / "b"),
        backbone=TINY,
        weights="none",
        epochs=1,
        batch_size=8,
        num_workers=0,
        cache_dir=str(cache),
    )
    assert plain["cache_hit_rate"] == 0.0


def test_linear_probe_uses_the_wider_features(multi_run, tmp_path):
    out, cache = multi_run
    r = headstart.train(
        str(out.parent / "data"),
        output=str(tmp_path / "p"),
        backbone=TINY,
        weights="none",
        strategy="linear-probe",
        num_workers=0,
        feature_blocks=2,
        cache_dir=str(cache),
    )
    wide = json.loads((out / "model.json").read_text())["backbone"]["feature_dim"]
    assert r["cache_hit_rate"] == 1.0  # the features the extract run cached
    assert json.loads((tmp_path / "p" / "model.json").read_text())["backbone"]["feature_dim"] == wide
    assert r["head"].startswith(f"{wide}→")


def test_finetune_with_feature_blocks_keeps_the_frozen_blocks_frozen(tiny_split, tmp_path):
    r = headstart.train(
        str(tiny_split),
        output=str(tmp_path / "ft"),
        backbone=TINY,
        weights="none",
        strategy="finetune",
        unfreeze=2,
        feature_blocks=3,
        epochs=1,
        batch_size=8,
        num_workers=0,
    )
    assert r["frozen_tensors_changed"] == 0 and r["trainable_tensors_changed"] > 0
    record = json.loads((tmp_path / "ft" / "model.json").read_text())
    assert record["backbone"]["feature_blocks"] == 3
    assert r["head"].startswith(f"{record['backbone']['feature_dim']}→")
