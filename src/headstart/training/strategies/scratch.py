"""scratch: the same architecture from random weights, every layer at one learning rate: the
baseline that shows what the pretrained weights are worth."""

from __future__ import annotations

from headstart.training.strategies.full import Full


class Scratch(Full):
    """Training from random initialisation."""

    name, default_epochs, default_lr = "scratch", 15, 3e-3
    pretrained, one_lr = False, True
