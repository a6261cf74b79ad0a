"""The backbone: a pretrained network without its classifier, images -> pooled features.

`create_backbone(name, weights=...)` resolves the name in the family registry (headstart.models.
sources), finds the weights (or takes --weights FILE / 'none') and builds it; `backbone_from_config`
rebuilds a saved one. `--feature-blocks K` makes the features pool the last K block groups.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from headstart.core.errors import ConfigError
from headstart.models.config import DEFAULT_BACKBONE, BackboneConfig
from headstart.models.sources import (
    FAMILIES,
    Family,
    WeightsLocation,
    children_groups,
    file_location,
    resolve_name,
    strip_last_linear,
    timm_groups,
)


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


def create_backbone(name: str = DEFAULT_BACKBONE, *, weights: str | None = None) -> Backbone:
    """Build a backbone by name; `weights` is None (pretrained, found on this machine), 'none', or a file."""
    family, arch = resolve_name(name)
    family.check(arch)
    location = resolve_weights(family, arch, weights)
    built = family.create(arch, location)
    return Backbone(built.body, built.config, built.groups)


def check_weights(name: str, weights: str | None = None) -> None:
    """Fail now, naming where it looked, when `name`'s weights are not on this machine (nothing built)."""
    family, arch = resolve_name(name)
    family.check(arch)
    resolve_weights(family, arch, weights)


def resolve_weights(family: Family, arch: str, weights: str | None) -> WeightsLocation | None:
    """Where the weights for `arch` come from: None for random init; WeightsError when missing."""
    if weights is not None and weights.lower() in ("none", "random", "scratch"):
        return None
    if weights:
        return file_location(weights)  # read (and checked) when the family loads it
    location = family.locate(arch)
    if not location.found:
        raise location.missing_error(family.full_name(arch))
    return location


@dataclass(frozen=True)
class BackboneEntry:
    """One row of `headstart backbones`."""

    name: str
    family: str
    weights: str | None  # where the pretrained weights are on this machine, or None


def list_backbones(*, family: str | None = None) -> list[BackboneEntry]:
    """Every known backbone name, with where its weights are on this machine (None: not here)."""
    out = []
    for fam in FAMILIES.values():
        if family is not None and fam.name != family:
            continue
        for arch in fam.archs():
            try:
                loc = fam.locate(arch)
            except Exception:  # noqa: BLE001 - a name without a pretrained config has no weights
                loc = None
            found = loc is not None and loc.found
            out.append(BackboneEntry(fam.full_name(arch), fam.name, str(loc.path) if found else None))
    return out


def backbone_from_config(cfg: BackboneConfig) -> Backbone:
    """Rebuild a saved backbone's architecture with random weights (the run's weights load next)."""
    if cfg.source == "torchvision":
        from torchvision.models import get_model

        model = get_model(cfg.arch, weights=None)
        strip_last_linear(model)
        return Backbone(model, cfg, children_groups(model))
    import timm

    model = timm.create_model(cfg.arch, pretrained=False, num_classes=0)
    return Backbone(model, cfg, timm_groups(model))
