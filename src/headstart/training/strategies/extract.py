"""extract: the backbone frozen (its BatchNorm in eval mode), the head trained on cached features."""

from __future__ import annotations

from headstart.models.freezing import freeze_backbone
from headstart.training.loop import fit as run_loop
from headstart.training.setup import Run
from headstart.training.strategies.base import Fitted, Inputs, Strategy
from headstart.training.strategies.inputs import feature_inputs


class Extract(Strategy):
    """Feature extraction: a forward pass per image, once; head epochs cost milliseconds."""

    name, default_epochs, default_lr = "extract", 30, 1e-3
    frozen_outputs = "features"
    seconds_key = "head_train_seconds"

    def freeze(self, model, cfg) -> list[str]:
        return freeze_backbone(model)

    def inputs(self, run: Run) -> Inputs:
        return feature_inputs(run)

    def fit(self, run: Run, inputs: Inputs) -> Fitted:
        return run_loop(run, inputs)
