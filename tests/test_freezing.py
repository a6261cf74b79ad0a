"""Freezing strategies, the BatchNorm policy and the frozen proof."""

from __future__ import annotations

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from headstart.core.errors import ConfigError, FrozenTensorChanged
from headstart.models.backbones import create_backbone
from headstart.models.freezing import (
    FrozenProof,
    compact_names,
    count_params,
    freeze_backbone,
    train_everything,
    unfreeze_last,
)
from headstart.models.heads import HeadSpec
from headstart.models.transfer import TransferModel


def _model(name="efficientnet_lite0", weights="none"):
    return TransferModel.build(create_backbone(name, weights=weights), HeadSpec(), ["a", "b"])


def test_extract_freezes_backbone_only():
    m = _model()
    assert freeze_backbone(m) == []
    trainable, frozen = count_params(m)
    assert trainable == 1280 * 2 + 2
    assert frozen == sum(p.numel() for p in m.backbone.parameters())


def test_finetune_unfreezes_last_groups():
    m = _model()
    names = unfreeze_last(m, 2)
    assert compact_names(names) == ["blocks.5", "blocks.6", "conv_head", "bn2"]
    assert all(not p.requires_grad for p in m.backbone.body.blocks[4].parameters())
    assert all(p.requires_grad for p in m.backbone.body.blocks[5].parameters())
    assert all(p.requires_grad for p in m.backbone.body.conv_head.parameters())
    assert not m.backbone.body.conv_stem.weight.requires_grad


def test_finetune_by_pattern_and_bad_patterns():
    m = _model()
    names = unfreeze_last(m, 0, [r"conv_head"])
    assert compact_names(names) == ["conv_head"]
    assert m.backbone.body.conv_head.weight.requires_grad
    assert not m.backbone.body.bn2.weight.requires_grad
    with pytest.raises(ConfigError, match="matches no module"):
        unfreeze_last(m, 0, ["nothing_like_this"])
    with pytest.raises(ConfigError, match="out of range"):
        unfreeze_last(m, 99)
    with pytest.raises(ConfigError, match="trains nothing"):
        unfreeze_last(m, 0)


def test_full_and_scratch_train_everything():
    m = _model()
    train_everything(m)
    assert count_params(m)[1] == 0


def test_frozen_bn_stays_in_eval_mode_and_keeps_statistics():
    m = _model()
    unfreeze_last(m, 1)
    m.train()
    bns = {n: mod for n, mod in m.named_modules() if isinstance(mod, _BatchNorm)}
    frozen = [n for n, b in bns.items() if not b.weight.requires_grad]
    trainable = [n for n, b in bns.items() if b.weight.requires_grad]
    assert frozen and trainable
    assert all(not bns[n].training for n in frozen)
    assert all(bns[n].training for n in trainable)
    proof = FrozenProof.take(m)
    m(torch.randn(4, 3, 64, 64) * 3 + 1)  # a forward in train mode would move BN stats if not eval
    report = proof.verify(m)
    assert report["frozen_tensors_changed"] == 0
    assert report["trainable_tensors_changed"] > 0  # the unfrozen BN's running stats did move


def test_proof_catches_a_tampered_frozen_tensor():
    m = _model()
    freeze_backbone(m)
    proof = FrozenProof.take(m)
    with torch.no_grad():
        m.backbone.body.blocks[3][0].conv_pw.weight[0, 0, 0, 0] += 1e-3
    with pytest.raises(FrozenTensorChanged, match="1 of"):
        proof.verify(m)
    report = proof.verify(m, raise_on_change=False)
    assert report["frozen_tensors_changed"] == 1
    assert report["changed_frozen_names"] == ["backbone.body.blocks.3.0.conv_pw.weight"]


def test_proof_catches_bn_statistics_drift_lightning_pitfall():
    """BN left in train mode (the track_running_stats pitfall) is caught by the proof."""
    m = _model()
    freeze_backbone(m)
    proof = FrozenProof.take(m)
    torch.nn.Module.train(m, True)  # plain train(): frozen BN layers are NOT kept in eval
    m(torch.randn(2, 3, 64, 64))
    report = proof.verify(m, raise_on_change=False)
    assert report["frozen_tensors_changed"] > 0
    assert any("running_mean" in n for n in report["changed_frozen_names"])


def test_proof_counts_cover_params_and_buffers():
    m = _model()
    freeze_backbone(m)
    proof = FrozenProof.take(m)
    n_params = sum(1 for _ in m.backbone.parameters())
    n_bn_buffers = sum(1 for n, _ in m.backbone.named_buffers())
    assert len(proof.frozen) == n_params + n_bn_buffers
    assert len(proof.trainable) == 2  # head weight and bias
