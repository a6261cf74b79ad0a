"""Exceptions a user can act on: each says what was received and what to do next."""

from __future__ import annotations


class HeadstartError(Exception):
    """Base class; the CLI prints the message as one paragraph and exits with `exit_code`."""

    exit_code = 1


class ConfigError(HeadstartError, ValueError):
    """An option or argument has a value headstart cannot use."""

    exit_code = 2


class DataError(HeadstartError):
    """A dataset folder or image file cannot be used."""

    exit_code = 2


class WeightsError(HeadstartError):
    """Pretrained weights are missing, unreadable or do not fit the model."""

    exit_code = 2


class DiskFull(HeadstartError):
    """A disk ran out of space; the message says where, how much, and what was kept."""

    exit_code = 2


class FrozenTensorChanged(HeadstartError):
    """A tensor that was meant to stay frozen changed during training."""

    exit_code = 3


class TrainingDiverged(HeadstartError):
    """The loss became NaN or infinite."""

    exit_code = 3


class RunInterrupted(HeadstartError):
    """SIGTERM or Ctrl-C stopped training after saving a checkpoint; `--resume` continues it."""

    exit_code = 130


def loader_message(e: BaseException) -> str:
    """The first line of a loading error, without torch's advice to load with weights_only=False:
    headstart never loads a file that way, so it never suggests it."""
    text = str(e).strip()
    if "Weights only load failed" in text or "weights_only" in text:
        return "it holds Python objects other than tensors, which could run code when loaded"
    return text.splitlines()[0][:300] if text else ""


def did_you_mean(value: str, choices: list[str], n: int = 3) -> str:
    """Return ' Did you mean: a, b?' for the closest choices, or ''."""
    import difflib

    close = difflib.get_close_matches(value, choices, n=n, cutoff=0.5)
    return f" Did you mean: {', '.join(close)}?" if close else ""
