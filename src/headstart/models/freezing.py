"""Freezing, unfreezing, the BatchNorm policy and the frozen proof.

Policy: a frozen BatchNorm layer stays in eval mode while the rest of the model trains, so its
running statistics never move (unlike `track_running_stats=False`, which would normalise with
batch statistics). The frozen proof checksums every frozen tensor, parameters and BN buffers,
before and after training.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from headstart.core.digest import tensor_checksum
from headstart.core.errors import ConfigError, FrozenTensorChanged

_FROZEN = "_headstart_frozen"


def freeze(module: nn.Module) -> None:
    """Stop gradients for every parameter of `module` and mark it (and its BN layers) frozen."""
    for m in module.modules():
        setattr(m, _FROZEN, True)
    for p in module.parameters():
        p.requires_grad_(False)


def make_trainable(module: nn.Module) -> None:
    """Undo `freeze` for `module` and everything inside it."""
    for m in module.modules():
        setattr(m, _FROZEN, False)
    for p in module.parameters():
        p.requires_grad_(True)


def is_frozen_bn(m: nn.Module) -> bool:
    """A BN layer is frozen when marked so, or when it has parameters and none of them train."""
    if not isinstance(m, _BatchNorm):
        return False
    params = list(m.parameters(recurse=False))
    if params:
        return not any(p.requires_grad for p in params)
    return bool(getattr(m, _FROZEN, False))


def keep_frozen_bn_eval(model: nn.Module) -> int:
    """Put every frozen BN layer in eval mode (call after `model.train()`); returns how many."""
    n = 0
    for m in model.modules():
        if is_frozen_bn(m):
            m.eval()
            n += 1
    return n


class FrozenBNStaysEval(nn.Module):
    """Base for modules whose `train()` keeps frozen BatchNorm layers in eval mode (the policy above)."""

    def train(self, mode: bool = True):
        """Like nn.Module.train, but frozen BatchNorm layers stay in eval mode."""
        super().train(mode)
        if mode:
            keep_frozen_bn_eval(self)
        return self


def freeze_backbone(model: nn.Module) -> list[str]:
    """Feature extraction: the whole backbone frozen, the head trains; returns [] (nothing unfrozen)."""
    make_trainable(model.head)
    freeze(model.backbone)
    return []


def train_everything(model: nn.Module) -> list[str]:
    """Full fine-tuning or training from scratch: every tensor trains."""
    make_trainable(model)
    return ["<all>"]


def unfreeze_last(model: nn.Module, groups: int, patterns: Sequence[str] = ()) -> list[str]:
    """Fine-tuning: freeze the backbone, then let its last `groups` block groups (and modules whose
    names match a regex in `patterns`) train; returns the names of the unfrozen modules."""
    backbone = model.backbone
    freeze_backbone(model)
    block_groups = backbone.block_groups()
    if groups < 0 or groups > len(block_groups):
        raise ConfigError(
            f"--unfreeze {groups} is out of range: {backbone.config.name} has {len(block_groups)} "
            f"block groups (0 to {len(block_groups)})."
        )
    if groups == 0 and not patterns:
        raise ConfigError(
            "finetune with --unfreeze 0 and no --unfreeze-pattern trains nothing of the "
            "backbone; use --strategy extract, or unfreeze at least one group."
        )
    names = [n for g in block_groups[len(block_groups) - groups :] for n in g] if groups else []
    names += matching_modules(backbone, patterns)
    for n in dict.fromkeys(names):
        make_trainable(backbone.get_submodule(n))
    return list(dict.fromkeys(names))


def matching_modules(module: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Names of submodules that match any regex; a pattern that matches nothing is an error."""
    out = []
    all_names = [n for n, _ in module.named_modules() if n]
    for pat in patterns:
        try:
            rx = re.compile(pat)
        except re.error as e:
            raise ConfigError(f"--unfreeze-pattern {pat!r} is not a valid regex: {e}") from e
        hits = [n for n in all_names if rx.search(n)]
        if not hits:
            raise ConfigError(
                f"--unfreeze-pattern {pat!r} matches no module of the backbone. Module names "
                f"look like: {', '.join(all_names[-5:])} (see `headstart summary`)."
            )
        out += hits
    return out


def compact_names(names: Sequence[str]) -> list[str]:
    """Module names shortened to their block: body.blocks.5.0.conv_pw -> blocks.5."""
    out = []
    for n in names:
        parts = n.removeprefix("body.").split(".")
        keep = next((i + 1 for i, p in enumerate(parts[:3]) if p.isdigit()), 1)
        out.append(".".join(parts[:keep]))
    return list(dict.fromkeys(out))


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    t = sum(p.numel() for p in model.parameters() if p.requires_grad)
    f = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return t, f


# ----------------------------------------------------------------------------- frozen proof


def frozen_tensor_names(model: nn.Module) -> tuple[list[str], list[str]]:
    """(frozen, trainable) tensor names: parameters by requires_grad, BN buffers by BN policy."""
    frozen, trainable = [], []
    for name, p in model.named_parameters():
        (trainable if p.requires_grad else frozen).append(name)
    for mname, m in model.named_modules():
        if isinstance(m, _BatchNorm):
            for bname, _ in m.named_buffers(recurse=False):
                full = f"{mname}.{bname}" if mname else bname
                (frozen if is_frozen_bn(m) else trainable).append(full)
    return frozen, trainable


@dataclass
class FrozenProof:
    """Checksums of every tensor taken before training, compared after it."""

    frozen: dict[str, str]
    trainable: dict[str, str]

    @classmethod
    def take(cls, model: nn.Module) -> FrozenProof:
        """Checksum every frozen and trainable tensor now."""
        frozen, trainable = frozen_tensor_names(model)
        tensors = dict(model.named_parameters()) | dict(model.named_buffers())
        return cls(
            frozen={n: tensor_checksum(tensors[n]) for n in frozen},
            trainable={n: tensor_checksum(tensors[n]) for n in trainable},
        )

    def verify(self, model: nn.Module, *, raise_on_change: bool = True) -> dict:
        """Compare with `model` now; raise FrozenTensorChanged if any frozen tensor moved."""
        tensors = dict(model.named_parameters()) | dict(model.named_buffers())
        changed = [n for n, c in self.frozen.items() if tensor_checksum(tensors[n]) != c]
        moved = sum(tensor_checksum(tensors[n]) != c for n, c in self.trainable.items())
        report = {
            "frozen_tensors_checked": len(self.frozen),
            "frozen_tensors_changed": len(changed),
            "trainable_tensors_checked": len(self.trainable),
            "trainable_tensors_changed": int(moved),
            "changed_frozen_names": changed[:20],
        }
        if changed and raise_on_change:
            raise FrozenTensorChanged(
                f"Frozen proof failed: {len(changed)} of {len(self.frozen)} frozen tensors "
                f"changed during training (e.g. {', '.join(changed[:3])}). Something trained "
                "or updated statistics of a layer that was meant to stay frozen; the run is "
                "not trustworthy."
            )
        return report
