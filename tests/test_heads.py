"""Heads: linear, MLP, binary; losses and probabilities."""

from __future__ import annotations

import pytest
import torch

from headstart.core.errors import ConfigError
from headstart.core.metrics import probabilities
from headstart.models.heads import HeadSpec, build_head, make_loss


def test_parse_and_describe():
    assert HeadSpec.parse("linear").describe(1280, 3) == "1280→3"
    spec = HeadSpec.parse("mlp:1024,256", dropout=0.2)
    assert spec.hidden == (1024, 256) and spec.describe(1280, 5) == "1280→1024→256→5"
    assert HeadSpec.parse("binary").describe(512, 2) == "512→1"
    assert HeadSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("text", ["mlp:a,b", "conv", "mlp:"])
def test_bad_specs(text):
    if text == "mlp:":
        assert HeadSpec.parse(text).hidden == (512,)
        return
    with pytest.raises(ConfigError):
        HeadSpec.parse(text)


def test_shapes_and_dropout_layers():
    h = build_head(HeadSpec.parse("mlp:512,256", dropout=0.5), 1280, 4)
    assert h(torch.randn(3, 1280)).shape == (3, 4)
    assert sum(isinstance(m, torch.nn.Dropout) for m in h) == 3
    assert build_head(HeadSpec("binary"), 64, 2)(torch.randn(5, 64)).shape == (5, 1)
    with pytest.raises(ConfigError, match="exactly 2 classes"):
        build_head(HeadSpec("binary"), 64, 3)


def test_binary_probabilities_and_loss():
    logits = torch.tensor([[0.0], [2.0]])
    p = probabilities(logits, "binary")
    assert torch.allclose(p.sum(1), torch.ones(2))
    assert p[0, 1] == pytest.approx(0.5) and p[1, 1] == pytest.approx(torch.sigmoid(torch.tensor(2.0)))
    loss = make_loss("binary")(logits, torch.tensor([0, 1]))
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        logits.reshape(-1), torch.tensor([0.0, 1.0])
    )
    assert loss.item() == pytest.approx(expected.item())
    weighted = make_loss("linear", class_weights=torch.tensor([1.0, 3.0]), label_smoothing=0.1)
    assert isinstance(weighted, torch.nn.CrossEntropyLoss) and weighted.label_smoothing == 0.1
