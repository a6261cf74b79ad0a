"""finetune: the last --unfreeze block groups (and --unfreeze-pattern modules) train with the head,
at --backbone-lr-mult x the head's learning rate; everything else stays frozen."""

from __future__ import annotations

from headstart.models.freezing import unfreeze_last
from headstart.training.loop import fit as run_loop
from headstart.training.setup import Run
from headstart.training.strategies.base import Fitted, Inputs, Strategy
from headstart.training.strategies.inputs import image_inputs


class Finetune(Strategy):
    """Fine-tuning on augmented images."""

    name, default_epochs, default_lr = "finetune", 8, 1e-3

    def freeze(self, model, cfg) -> list[str]:
        return unfreeze_last(model, cfg.unfreeze, cfg.unfreeze_patterns)

    def inputs(self, run: Run) -> Inputs:
        return image_inputs(run)

    def fit(self, run: Run, inputs: Inputs) -> Fitted:
        return run_loop(run, inputs)
