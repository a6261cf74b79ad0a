"""Image folders, train/val splits, transforms and safe image loading.

Layouts understood:
  DATA/train/<class>/*, DATA/val/<class>/*   (also valid/validation/test as the val folder)
  DATA/<class>/* with --val OTHER/<class>/*  (a separate validation tree)
  DATA/<class>/*                             (split into train/val, stratified and seeded)
"""

from __future__ import annotations

import os
import warnings
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from headstart.device import available_cores
from headstart.errors import ConfigError, DataError

IMG_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif",
)  # fmt: skip
VAL_DIR_NAMES = ("val", "valid", "validation", "test")
IGNORED_NAMES = {"__MACOSX", ".DS_Store", "Thumbs.db", "desktop.ini", ".ipynb_checkpoints"}
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not grey pixels


@dataclass
class Skipped:
    """A file left out, and why."""

    path: str
    reason: str

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return {"path": self.path, "reason": self.reason}


@dataclass
class DataSplit:
    """Class names and the (path, label) items of each split, plus what was left out."""

    classes: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    layout: str
    skipped: list[Skipped] = field(default_factory=list)

    def counts(self, split: str) -> dict[str, int]:
        """Images per class in 'train' or 'val'."""
        c = Counter(y for _, y in getattr(self, split))
        return {name: c.get(i, 0) for i, name in enumerate(self.classes)}

    def to_dict(self) -> dict:
        """JSON form saved as split.json, so evaluation can reuse the exact validation files."""
        return {
            "classes": self.classes,
            "layout": self.layout,
            "train": [[p, y] for p, y in self.train],
            "val": [[p, y] for p, y in self.val],
            "skipped": [s.to_dict() for s in self.skipped],
        }

    @classmethod
    def from_dict(cls, d: dict) -> DataSplit:
        """Inverse of to_dict."""
        return cls(
            classes=list(d["classes"]),
            train=[(p, int(y)) for p, y in d["train"]],
            val=[(p, int(y)) for p, y in d["val"]],
            layout=d.get("layout", ""),
            skipped=[Skipped(**s) for s in d.get("skipped", [])],
        )


def _is_ignored(name: str) -> bool:
    return name.startswith(".") or name in IGNORED_NAMES


def scan_class_tree(
    root: str | os.PathLike,
) -> tuple[list[str], list[tuple[str, int]], list[Skipped]]:
    """Classes (sorted subfolder names), image items and skipped files of one class tree."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Data folder {str(root)!r} does not exist or is not a folder.")
    skipped: list[Skipped] = []
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not _is_ignored(p.name))
    per_class: dict[str, list[str]] = {}
    for d in class_dirs:
        files = []
        for dirpath, dirnames, filenames in os.walk(d):
            dirnames[:] = sorted(n for n in dirnames if not _is_ignored(n))
            for fn in sorted(filenames):
                path = os.path.join(dirpath, fn)
                if _is_ignored(fn):
                    skipped.append(Skipped(path, "hidden or system file"))
                elif fn.lower().endswith(IMG_EXTENSIONS):
                    files.append(path)
                else:
                    skipped.append(Skipped(path, "not an image file extension"))
        if files:
            per_class[d.name] = files
        else:
            skipped.append(Skipped(str(d), "empty class folder (no images): class left out"))
    loose = [p for p in root.iterdir() if p.is_file() and not _is_ignored(p.name)]
    for p in sorted(loose):
        skipped.append(Skipped(str(p), "file outside any class folder"))
    classes = sorted(per_class)
    items = [(p, i) for i, c in enumerate(classes) for p in per_class[c]]
    return classes, items, skipped


def resolve_data(
    data: str | os.PathLike,
    *,
    val: str | os.PathLike | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> DataSplit:
    """Find train/val items in any supported layout."""
    data = Path(data)
    if not data.is_dir():
        raise DataError(
            f"Data folder {str(data)!r} does not exist. Pass a folder with train/ and val/ "
            "class subfolders, or one folder of class subfolders."
        )
    train_dir = data / "train"
    val_dir = Path(val) if val else next((data / n for n in VAL_DIR_NAMES if (data / n).is_dir()), None)
    if val is None and train_dir.is_dir() and val_dir is not None:
        classes, train, sk1 = scan_class_tree(train_dir)
        vclasses, vitems, sk2 = scan_class_tree(val_dir)
        layout = f"{train_dir.name}/ + {val_dir.name}/"
    elif val is not None:
        root = train_dir if train_dir.is_dir() else data
        classes, train, sk1 = scan_class_tree(root)
        vclasses, vitems, sk2 = scan_class_tree(val_dir)
        layout = "separate validation folder"
    else:
        root = train_dir if train_dir.is_dir() else data
        classes, items, sk1 = scan_class_tree(root)
        _check_classes(classes, items, root)
        train, vitems = stratified_split(items, val_fraction, seed)
        vclasses, sk2 = classes, []
        layout = f"single class tree, stratified {1 - val_fraction:.0%}/{val_fraction:.0%} split"
    _check_classes(classes, train, data)
    unknown = sorted(set(vclasses) - set(classes))
    if unknown:
        raise DataError(
            f"Validation folder {str(val_dir)!r} has classes not in training: {unknown}. "
            f"Training classes are {classes}; rename or remove those folders."
        )
    remap = {i: classes.index(c) for i, c in enumerate(vclasses)}
    vitems = [(p, remap[y]) for p, y in vitems]
    if not vitems:
        raise DataError(f"No validation images found for {str(data)!r} ({layout}).")
    return DataSplit(classes, train, vitems, layout, sk1 + sk2)


def _check_classes(classes: list[str], items: list, where: Path) -> None:
    if len(classes) < 2:
        raise DataError(
            f"Found {len(classes)} class folder(s) with images in {str(where)!r}; a classifier "
            "needs at least 2. Put each class's images in its own subfolder, "
            "e.g. DATA/train/cats/*.jpg and DATA/train/dogs/*.jpg."
        )


def stratified_split(
    items: list[tuple[str, int]], val_fraction: float, seed: int
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Split keeping class proportions; at least one validation image per class."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"--val-fraction must be between 0 and 1; received {val_fraction}.")
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[tuple[str, int]]] = {}
    for it in items:
        by_class.setdefault(it[1], []).append(it)
    train, val = [], []
    for y in sorted(by_class):
        group = by_class[y]
        if len(group) < 2:
            raise DataError(
                f"Class folder of {group[0][0]!r} has 1 image: too few to split into train and "
                "val. Add images, or pass a separate --val folder."
            )
        order = rng.permutation(len(group))
        n_val = min(len(group) - 1, max(1, round(len(group) * val_fraction)))
        val += [group[i] for i in order[:n_val]]
        train += [group[i] for i in order[n_val:]]
    return sorted(train), sorted(val)


# ----------------------------------------------------------------------------- image loading


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: 16-bit scaled (not clipped), transparency on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        # I;16 is 16-bit by definition (a dark frame stays dark); I/F: guess from the values
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "L" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        bg = Image.new("RGB", img.size, BACKGROUND)
        bg.paste(img, mask=img.getchannel("A"))
        return bg
    return img.convert("RGB") if img.mode != "RGB" else img


def load_image(path: str | os.PathLike, *, draft: int | None = None) -> Image.Image:
    """Open an image safely as RGB: EXIF orientation applied, bombs refused, JPEGs decoded small.

    `draft` lets the JPEG decoder skip detail below that size (DCT scaling), which makes large
    photos several times cheaper to decode when they are resized down anyway.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            if draft and img.format == "JPEG":
                img.draft("RGB", (draft, draft))
            img = ImageOps.exif_transpose(img)
            img.load()
            return to_rgb(img)


# Leading bytes of formats Pillow cannot read here, named so the user knows what the file is.
_FOREIGN_MAGIC = (
    (b"ftypheic", "HEIC"), (b"ftypheix", "HEIC"), (b"ftypmif1", "HEIF"), (b"ftypavif", "AVIF"),
    (b"%PDF", "PDF"), (b"8BPS", "Photoshop PSD"), (b"<svg", "SVG"), (b"<?xml", "XML/SVG"),
    (b"PK\x03\x04", "ZIP archive"), (b"<!DOCTYPE html", "HTML page"), (b"<html", "HTML page"),
)  # fmt: skip


def explain_failure(path: str | os.PathLike, e: BaseException) -> str:
    """A reason a person can act on for a file load_image refused (shared by training and doctor)."""
    msg = str(e).splitlines()[0] if str(e) else ""
    if isinstance(e, Image.DecompressionBombError | Image.DecompressionBombWarning):
        return f"decompression bomb: {msg}"
    if isinstance(e, PermissionError):
        return "unreadable: permission denied"
    if isinstance(e, Image.UnidentifiedImageError):
        try:
            with open(path, "rb") as f:
                head = f.read(512)
        except OSError as oe:
            return f"unreadable: {oe}"
        if not head:
            return "empty file (0 bytes)"
        for magic, name in _FOREIGN_MAGIC:
            if magic in head[:64]:
                return f"unsupported format: {name} file with a {Path(path).suffix} extension"
        if all(32 <= b < 127 or b in b"\t\r\n" for b in head):
            return f"not an image: a text file with a {Path(path).suffix} extension"
        return "not an image: content is no known image format despite the extension"
    if isinstance(e, OSError) and "truncated" in msg:
        return f"truncated file: {msg}"
    return f"{type(e).__name__}: {msg}"


# ----------------------------------------------------------------------------- transforms


@dataclass(frozen=True)
class Preprocess:
    """Model-side preprocessing, saved in model.json so prediction needs no training options."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875

    @property
    def resize_size(self) -> int:
        """Shorter side before the centre crop."""
        return int(round(self.input_size / self.crop_pct))

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return {
            "input_size": self.input_size,
            "resize_size": self.resize_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        """Inverse of to_dict."""
        return cls(
            input_size=int(d["input_size"]),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            interpolation=d.get("interpolation", "bicubic"),
            crop_pct=float(d.get("crop_pct", 0.875)),
        )


@dataclass(frozen=True)
class Augment:
    """Training augmentations. Defaults follow the tutorials: random resized crop + flip."""

    crop_scale: float = 0.08
    hflip: bool = True
    vflip: bool = False
    rotation: float = 0.0
    color_jitter: float = 0.0


def _interp(name: str) -> T.InterpolationMode:
    try:
        return T.InterpolationMode(name)
    except ValueError:
        return T.InterpolationMode.BILINEAR


def eval_transform(pp: Preprocess, *, normalize: bool = True) -> T.Compose:
    """Resize the shorter side, centre crop, normalise (normalize=False: [0, 1] floats, as exported
    models take them)."""
    ops = [T.Resize(pp.resize_size, interpolation=_interp(pp.interpolation)), T.CenterCrop(pp.input_size),
           T.ToTensor()]  # fmt: skip
    return T.Compose(ops + [T.Normalize(pp.mean, pp.std)] if normalize else ops)


def train_transform(pp: Preprocess, aug: Augment = Augment()) -> T.Compose:
    """Random resized crop (+ flips, rotation, colour jitter if asked), normalise."""
    ops: list = [
        T.RandomResizedCrop(
            pp.input_size, scale=(aug.crop_scale, 1.0), interpolation=_interp(pp.interpolation)
        )
    ]
    if aug.hflip:
        ops.append(T.RandomHorizontalFlip())
    if aug.vflip:
        ops.append(T.RandomVerticalFlip())
    if aug.rotation:
        ops.append(T.RandomRotation(aug.rotation, interpolation=_interp("bilinear")))
    if aug.color_jitter:
        j = aug.color_jitter
        ops.append(T.ColorJitter(brightness=j, contrast=j, saturation=j, hue=min(0.5, j / 4)))
    ops += [T.ToTensor(), T.Normalize(pp.mean, pp.std)]
    return T.Compose(ops)


# ----------------------------------------------------------------------------- datasets


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
