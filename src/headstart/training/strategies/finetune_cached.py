"""finetune --cache-prefix: the frozen prefix's activation maps are cached once; the epochs train
only the unfrozen suffix and the head on them (flip-only augmentation; headstart.features.prefix)."""

from __future__ import annotations

from headstart.training.setup import Run
from headstart.training.strategies.base import Inputs
from headstart.training.strategies.finetune import Finetune
from headstart.training.strategies.inputs import prefix_inputs


class FinetuneCachedPrefix(Finetune):
    """Fine-tuning on cached maps of the frozen blocks."""

    name, variant = "finetune-cache-prefix", ("finetune", "cache_prefix")
    frozen_outputs = "maps"

    def inputs(self, run: Run) -> Inputs:
        return prefix_inputs(run)
