"""full: every layer of the pretrained network trains (the backbone at --backbone-lr-mult x lr)."""

from __future__ import annotations

from headstart.models.freezing import train_everything
from headstart.training.strategies.finetune import Finetune


class Full(Finetune):
    """Full fine-tuning on augmented images."""

    name, default_epochs, default_lr = "full", 8, 3e-4

    def freeze(self, model, cfg) -> list[str]:
        return train_everything(model)
