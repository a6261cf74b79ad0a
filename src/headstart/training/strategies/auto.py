"""auto: choose the recipe for this data, this machine and this budget (headstart.training.auto),
then train it. The plug-in only chooses; the chosen strategy's plug-in trains."""

from __future__ import annotations

from collections.abc import Callable

from headstart.training.auto.search import Plan, choose
from headstart.training.auto.shared_pass import warm
from headstart.training.strategies.base import Fitted, Inputs, Strategy


class Auto(Strategy):
    """Measure, plan, search on an inner split, then the winner within the budget."""

    name, default_epochs, default_lr = "auto", 1, 1e-3  # epochs and lr come from the chosen recipe

    def choose(self, cfg, *, run: Callable) -> Plan:
        """The final run's config and deadline; `run` trains each pilot (training.run.run)."""
        return choose(cfg, run=run, warm=warm)

    def freeze(self, model, cfg) -> list[str]:
        raise AssertionError("auto chooses another strategy before anything is built")

    def inputs(self, run) -> Inputs:
        raise AssertionError("auto chooses another strategy before anything is built")

    def fit(self, run, inputs: Inputs) -> Fitted:
        raise AssertionError("auto chooses another strategy before anything is built")
