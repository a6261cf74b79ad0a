"""The transfer model: a pretrained backbone with a new head, honouring the frozen-BN policy."""

from __future__ import annotations

import torch
from torch import nn

from headstart.models.backbones import Backbone
from headstart.models.freezing import FrozenBNStaysEval
from headstart.models.heads import HeadSpec, build_head


class TransferModel(FrozenBNStaysEval):
    """backbone -> pooled features -> head; `train()` keeps frozen BatchNorm layers in eval."""

    def __init__(self, backbone: Backbone, head: nn.Module, head_spec: HeadSpec, classes: list[str]):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.head_spec = head_spec
        self.classes = list(classes)
        self.tta = "none"  # test-time augmentation of inference (models/tta.py); training never uses it

    @classmethod
    def build(cls, backbone: Backbone, head_spec: HeadSpec, classes: list[str]) -> TransferModel:
        """Attach a fresh head for `classes` to `backbone`."""
        head = build_head(head_spec, backbone.feature_dim, len(classes))
        return cls(backbone, head, head_spec, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits. Frozen layers see inputs without requires_grad, so they record no graph."""
        return self.head(self.backbone(x))
