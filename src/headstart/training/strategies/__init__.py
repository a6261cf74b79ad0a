"""Training strategies: one module each, registered here by one line each.

A new strategy is a module with a Strategy subclass (freeze, inputs, fit) and a line below.
"""

from headstart.training.strategies.auto import Auto
from headstart.training.strategies.base import (
    REGISTRY,
    Strategy,
    get_strategy,
    public_names,
    register,
    select,
)
from headstart.training.strategies.extract import Extract
from headstart.training.strategies.finetune import Finetune
from headstart.training.strategies.finetune_cached import FinetuneCachedPrefix
from headstart.training.strategies.full import Full
from headstart.training.strategies.linear_probe import LinearProbe
from headstart.training.strategies.scratch import Scratch

register(Extract())
register(LinearProbe())
register(Finetune())
register(FinetuneCachedPrefix())
register(Full())
register(Scratch())
register(Auto())

__all__ = ["REGISTRY", "Strategy", "get_strategy", "public_names", "select"]
