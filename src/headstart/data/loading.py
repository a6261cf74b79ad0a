"""Datasets of image files and the DataLoader that feeds them: failures travel with the batch."""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from headstart.core.device import available_cores
from headstart.data.images import explain_failure, load_image


class ImageDataset(Dataset):
    """(path, label) items -> (tensor, label, index); a file that fails yields its error instead.

    With `seed`, each sample's random augmentation is seeded by (seed, epoch, index), so it does
    not depend on the number of DataLoader workers or on where a resumed run restarted. With
    `seed_by_path`, the file path replaces the index (a cached augmented view stays valid when
    other files come and go).
    """

    def __init__(
        self,
        items: list[tuple[str, int]],
        transform,
        *,
        draft: int | None = None,
        seed: int | None = None,
        seed_by_path: bool = False,
    ):
        self.items = items
        self.transform = transform
        self.draft = draft
        self.seed = seed
        self.seed_by_path = seed_by_path
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        try:
            img = load_image(path, draft=self.draft)
            if self.seed is None:
                x = self.transform(img)
            else:
                key = zlib.crc32(os.path.abspath(path).encode()) if self.seed_by_path else i
                with torch.random.fork_rng(devices=[]):
                    # only the CPU generator: torch.manual_seed would also reseed CUDA's
                    torch.default_generator.manual_seed(
                        ((self.seed * 1_000_003 + self.epoch) * 10_000_019 + key) % 2**63
                    )
                    x = self.transform(img)
        except Exception as e:  # noqa: BLE001 - reported per file, never fatal here
            return None, label, i, explain_failure(path, e)
        return x, label, i, None


@dataclass
class Batch:
    """A collated batch; `failed` holds (index, reason) of items that could not be loaded."""

    x: torch.Tensor | None
    y: torch.Tensor
    index: torch.Tensor
    failed: list[tuple[int, str]]

    def pin_memory(self) -> Batch:
        """Let DataLoader(pin_memory=True) pin this custom batch."""
        if self.x is not None:
            self.x = self.x.pin_memory()
        return self


def collate(samples: list) -> Batch:
    """Stack the good samples, keep the failed ones aside."""
    good = [s for s in samples if s[3] is None]
    failed = [(s[2], s[3]) for s in samples if s[3] is not None]
    x = torch.stack([s[0] for s in good]) if good else None
    y = torch.tensor([s[1] for s in good], dtype=torch.long)
    idx = torch.tensor([s[2] for s in good], dtype=torch.long)
    return Batch(x, y, idx, failed)


def default_workers() -> int:
    """Loader processes: one per core beyond the one the model's main thread uses, at least 1."""
    n = available_cores()
    return max(1, min(8, n - 1)) if n > 1 else 0


def ramp_batches(n: int, batch_size: int, first: int = 8) -> list[list[int]]:
    """Indices 0..n-1 in order, in batches of first, 2*first, 4*first … capped at batch_size."""
    out, start, size = [], 0, max(1, min(first, batch_size))
    while start < n:
        out.append(list(range(start, min(n, start + size))))
        start += size
        size = min(batch_size, size * 2)
    return out


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    num_workers: int | None = None,
    seed: int = 0,
    pin_memory: bool = False,
    drop_last: bool = False,
    sampler=None,
    ramp: bool = False,
) -> DataLoader:
    """A DataLoader with seeded shuffling and worker seeding, so runs repeat exactly.

    ramp=True (in-order passes only): batches grow 8, 16, 32 … up to batch_size, so the model
    starts on the first few images instead of idling while the workers decode a full batch.
    """
    workers = default_workers() if num_workers is None else num_workers
    g = torch.Generator()
    g.manual_seed(seed)
    if ramp and not shuffle and sampler is None and not drop_last:
        batching = dict(batch_sampler=ramp_batches(len(dataset), batch_size))
    else:
        batching = dict(batch_size=batch_size, shuffle=shuffle if sampler is None else None, sampler=sampler,
                        drop_last=drop_last)  # fmt: skip
    return DataLoader(
        dataset,
        **batching,
        num_workers=workers,
        collate_fn=collate,
        generator=g,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )


def worker_death(e: BaseException) -> str | None:
    """What a DataLoader's "worker ... killed by signal" / "exited unexpectedly" error means, or None."""
    msg = str(e)
    if not isinstance(e, RuntimeError) or "DataLoader worker" not in msg:
        return None
    first = msg.strip().splitlines()[0]
    if "Killed" in msg or "SIGKILL" in msg:
        cause = "SIGKILL is usually the kernel's out-of-memory killer taking the largest process"
    elif "Terminated" in msg or "SIGTERM" in msg:
        cause = "SIGTERM reached the worker (a job scheduler, or `kill` on the process list)"
    else:
        cause = "it was killed or crashed: most often by the kernel's out-of-memory killer"
    return f"a data-loading worker process died ({first}); {cause}"


class SlicedBatches:
    """Batches cut from a dataset that can read many samples at once (`take(rows)`, `y`, `index`):
    cached features or prefix maps. The same order, batches and values as a DataLoader over it,
    without a Python call and a collate per sample."""

    def __init__(self, ds, order, *, batch_size: int, drop_last: bool = False):
        self.ds, self.order, self.batch_size, self.drop_last = ds, order, batch_size, drop_last

    def __len__(self) -> int:
        n = len(self.order)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        rows = list(self.order)
        end = len(rows) - len(rows) % self.batch_size if self.drop_last else len(rows)
        for start in range(0, end, self.batch_size):
            chunk = rows[start : start + self.batch_size]
            yield Batch(
                self.ds.take(chunk),
                torch.as_tensor(self.ds.y)[chunk],
                torch.as_tensor(self.ds.index)[chunk],
                [],
            )
