"""Training layer: options, run setup, the loop, checkpoints and the strategy plug-ins.

Importing the strategies package registers every plug-in before any option is checked.
"""

from headstart.training import strategies  # noqa: F401
