"""Crash-safe runs: atomic checkpoints, exact resume, and a clean stop on SIGTERM / Ctrl-C.

A checkpoint (RUN/checkpoint.pt) holds everything the loop needs to continue as if it had never
stopped: weights of the trained part, optimizer and scheduler state, every RNG state, the position
(epoch and step within it), the per-epoch running totals, the best-so-far weights, the metrics so
far, the files that failed to load, and the identity of the cached features (extract strategy).

Exactness rests on two choices: the training order is a pure function of (seed, epoch)
(`ResumableSampler`), and each sample's augmentation is seeded by (seed, epoch, index)
(`ImageDataset(seed=...)`), so neither depends on how many DataLoader workers ran or where the
previous process stopped.
"""

from __future__ import annotations

import io
import os
import random
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Sampler

from headstart.core.errors import DataError, RunInterrupted, TrainingDiverged, loader_message
from headstart.core.files import CHECKPOINT, atomic_write_bytes
from headstart.core.logs import logger
from headstart.data.images import explain_failure, load_image
from headstart.data.loading import default_workers

if TYPE_CHECKING:
    from headstart.training.setup import Run
    from headstart.training.strategies.base import Inputs

CHECKPOINT_FORMAT = 1


class ResumableSampler(Sampler[int]):
    """A seeded permutation per epoch that can start part-way through (a multiple of the batch)."""

    def __init__(self, n: int, *, seed: int):
        self.n, self.seed = n, seed
        self.epoch, self.start = 1, 0
        self._orders: list[list[int]] = []  # epochs 1.. computed so far

    def set_epoch(self, epoch: int, *, start: int = 0) -> None:
        """Iterate epoch `epoch`'s order from position `start`."""
        self.epoch, self.start = epoch, start

    def orders(self, epochs: int):
        """The full order of epochs 1..`epochs`, each a function of the seed and the epoch only.

        They are the orders `DataLoader(shuffle=True, generator=seeded)` gives (per epoch it draws
        a worker base seed, then the sampler's permutation, then an empty remainder permutation),
        so checkpointing changes no result.
        """
        g = torch.Generator()
        g.manual_seed(self.seed)
        for _ in range(epochs):
            torch.empty((), dtype=torch.int64).random_(generator=g)
            perm = torch.randperm(self.n, generator=g).tolist()
            torch.randperm(self.n, generator=g)
            yield perm

    def order(self, epoch: int) -> list[int]:
        """The full order of `epoch` (computed once: head training asks every epoch)."""
        if len(self._orders) < epoch:
            self._orders = list(self.orders(epoch))
        return self._orders[epoch - 1]

    def __iter__(self):
        return iter(self.order(self.epoch)[self.start :])

    def __len__(self) -> int:
        return self.n - self.start


# ----------------------------------------------------------------------------- RNG states


def rng_state() -> dict:
    """Python, NumPy and torch (CPU and CUDA) generator states, in a weights_only-loadable form."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Inverse of rng_state."""
    random.setstate(_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    """random.setstate needs tuples where a round trip may give lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, list | tuple) else x


# ----------------------------------------------------------------------------- save / load


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """torch.save into memory, then an atomic write: a crash mid-save keeps the previous file."""
    for name, t in state["model"].items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise TrainingDiverged(
                f"Weight {name!r} holds NaN or infinite values; refusing to checkpoint a diverged "
                "model. Lower --lr and train again."
            )
    buf = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **state}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint with weights_only=True; a damaged or foreign file is a DataError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"No checkpoint {str(path)!r}: the run stopped before its first checkpoint. Start it "
            "again with the same options (add --overwrite)."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncation, garbage and code-carrying pickles alike
        first = loader_message(e)
        raise DataError(
            f"Checkpoint {str(path)!r} cannot be read ({type(e).__name__}: {first[:200]}). It is "
            "damaged, truncated, or holds objects other than tensors (headstart never unpickles "
            "code). Delete it and train again with --overwrite."
        ) from e
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"{str(path)!r} is not a headstart checkpoint (format {CHECKPOINT_FORMAT}).")
    return state


# ----------------------------------------------------------------------------- clean stop


class StopRequest:
    """While active, SIGTERM / SIGINT set a flag the loop checks after each step; a second one aborts."""

    def __init__(self):
        self.signal: str | None = None
        self._old: dict = {}
        self._pid = os.getpid()

    def __enter__(self) -> StopRequest:
        if _main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a DataLoader worker forked with this handler: the main process decides
            return
        if self.signal is not None:  # asked twice: stop now, without saving
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        logger.warning(
            "\nheadstart: %s received: finishing this step and saving a checkpoint "
            "(send it again to stop at once)",
            self.signal,
        )

    def __bool__(self) -> bool:
        return self.signal is not None


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ----------------------------------------------------------------------------- resume and stop


def interrupted(signame: str, run: Run, epoch: int, batches: int, per_epoch: int) -> RunInterrupted:
    """The clean-stop error: where the run stopped and the command that continues it."""
    return RunInterrupted(
        f"{signame} received: stopped at epoch {epoch}, batch {batches}/{per_epoch}, after saving "
        f"{str(run.out / CHECKPOINT)!r}. Continue with: headstart train --resume {run.out}"
    )


def worker_died(why: str, run: Run, inputs: Inputs) -> RunInterrupted:
    """The paragraph for a dead loader worker: cause, what lowers memory, how to continue."""
    workers = inputs.workers if inputs.workers is not None else default_workers()
    return RunInterrupted(
        f"Training stopped: {why}. A checkpoint was saved at that point; continue with `headstart train "
        f"--resume {run.out}`, with fewer loader processes to use less memory: `--resume {run.out} --workers "
        f"{max(0, workers - 1)}` (now {workers}); a smaller --batch-size (now {run.cfg.batch_size}) needs a "
        "new run."
    )


def never_loaded_failures(sampler: ResumableSampler, batch_size: int, epochs: int, items: list) -> dict:
    """Files that drop_last left out of every epoch are read once here, so none is silently unchecked."""
    n = len(items)
    tail = n - n % batch_size
    unseen = set(range(n))
    for order in sampler.orders(epochs):
        unseen &= set(order[tail:])
    failures = {}
    for i in sorted(unseen):
        try:
            load_image(items[i][0], draft=64)
        except Exception as e:  # noqa: BLE001 - reported like any other unreadable file
            failures[items[i][0]] = explain_failure(items[i][0], e)
    return failures
