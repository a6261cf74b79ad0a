"""Classifier heads that replace a backbone's ImageNet classifier: linear, MLP, binary."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from headstart.core.errors import ConfigError

HEAD_KINDS = ("linear", "mlp", "binary")


@dataclass(frozen=True)
class HeadSpec:
    """What head to put on the backbone; `hidden` only for MLP heads."""

    kind: str = "linear"
    hidden: tuple[int, ...] = ()
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise ConfigError(
                f"Unknown head {self.kind!r}; use one of {', '.join(HEAD_KINDS)} "
                "(e.g. --head linear, --head mlp:512,256, --head binary)."
            )
        if self.kind == "mlp" and not self.hidden:
            raise ConfigError("An MLP head needs hidden sizes, e.g. --head mlp:512,256.")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"Dropout must be in [0, 1); received {self.dropout}.")

    @classmethod
    def parse(cls, text: str, dropout: float = 0.0) -> HeadSpec:
        """Parse 'linear', 'binary' or 'mlp:512,256'."""
        kind, _, rest = text.strip().partition(":")
        try:
            hidden = tuple(int(h) for h in rest.split(",") if h.strip()) if rest else ()
        except ValueError as e:
            raise ConfigError(
                f"Could not read hidden sizes in head {text!r}; write them as mlp:512,256."
            ) from e
        if kind == "mlp" and not hidden:
            hidden = (512,)
        return cls(kind=kind, hidden=hidden, dropout=dropout)

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> HeadSpec:
        """Inverse of to_dict."""
        return cls(kind=d["kind"], hidden=tuple(d.get("hidden", ())), dropout=d.get("dropout", 0))

    def describe(self, in_dim: int, num_classes: int) -> str:
        """Human form such as '1280→512→256→2'."""
        out = 1 if self.kind == "binary" else num_classes
        return "→".join(str(d) for d in (in_dim, *self.hidden, out))


def build_head(spec: HeadSpec, in_dim: int, num_classes: int) -> nn.Module:
    """The head module: features [B, in_dim] -> logits [B, num_classes] (or [B, 1] if binary)."""
    if spec.kind == "binary" and num_classes != 2:
        raise ConfigError(
            f"A binary head needs exactly 2 classes; the data has {num_classes}. "
            "Use --head linear (or mlp) for more classes."
        )
    layers: list[nn.Module] = []
    width = in_dim
    for h in spec.hidden:
        layers += [nn.Dropout(spec.dropout), nn.Linear(width, h), nn.ReLU(inplace=True)]
        width = h
    if spec.dropout:
        layers.append(nn.Dropout(spec.dropout))
    layers.append(nn.Linear(width, 1 if spec.kind == "binary" else num_classes))
    return nn.Sequential(*layers)


def make_loss(
    kind: str, *, label_smoothing: float = 0.0, class_weights: torch.Tensor | None = None
) -> nn.Module:
    """CrossEntropy for multi-class heads, BCEWithLogits for the single-logit binary head."""
    if kind == "binary":
        pos_weight = None
        if class_weights is not None:
            pos_weight = (class_weights[1] / class_weights[0]).reshape(1)
        return _BinaryLoss(label_smoothing, pos_weight)
    return nn.CrossEntropyLoss(weight=class_weights, label_smoothing=label_smoothing)


class _BinaryLoss(nn.Module):
    """BCEWithLogits on integer labels {0,1}, with the same label smoothing convention as CE."""

    def __init__(self, label_smoothing: float, pos_weight: torch.Tensor | None):
        super().__init__()
        self.smoothing = label_smoothing
        self.bce = nn.BCEWithLogitsLoss(pos_weight=pos_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        t = target.float()
        if self.smoothing:
            t = t * (1 - self.smoothing) + 0.5 * self.smoothing
        return self.bce(logits.reshape(-1).float(), t)
