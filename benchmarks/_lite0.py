"""The setup the frozen-work benchmarks share: quiet logs, this machine's threads, lite0 in eval mode."""

from __future__ import annotations

from headstart.core.device import configure_threads
from headstart.core.logs import configure
from headstart.models.backbones import create_backbone
from headstart.training.setup import preprocess_of


def frozen_lite0():
    """(threads, lite0 in eval mode, its preprocessing)."""
    configure(-1)
    threads = configure_threads()
    bb = create_backbone("efficientnet_lite0").eval()
    return threads, bb, preprocess_of(bb)
