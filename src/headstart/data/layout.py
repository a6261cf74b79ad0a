"""What a dataset folder is: one scanner, one ignore rule, used by train, doctor, evaluate and predict.

Layouts understood:
  DATA/train/<class>/*, DATA/val/<class>/*   (also valid/validation/test as the val folder)
  DATA/<class>/* with --val OTHER/<class>/*  (a separate validation tree)
  DATA/<class>/*                             (split into train/val, stratified and seeded)
Every entry that is not used is listed with the reason: hidden and system files, files that are
not images by extension, empty class folders, files outside any class folder, folders beside the
split folders.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from headstart.core.errors import ConfigError, DataError

IMG_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".ppm",
    ".bmp",
    ".pgm",
    ".tif",
    ".tiff",
    ".webp",
    ".gif",
)
VAL_DIR_NAMES = ("val", "valid", "validation", "test")
IGNORED_NAMES = {"__MACOSX", ".DS_Store", "Thumbs.db", "desktop.ini", ".ipynb_checkpoints"}


@dataclass
class Skipped:
    """A file or folder left out, and why."""

    path: str
    reason: str

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return {"path": self.path, "reason": self.reason}


def is_ignored(name: str) -> bool:
    """The one ignore rule: hidden entries and operating-system clutter."""
    return name.startswith(".") or name in IGNORED_NAMES


def _ignored_reason(path: str, is_dir: bool) -> str:
    if Path(path).name == "__MACOSX":
        return "hidden or system folder (macOS archive metadata; safe to delete)"
    return f"hidden or system {'folder' if is_dir else 'file'}"


def walk_images(folder: str | os.PathLike) -> tuple[list[str], list[Skipped]]:
    """Image files under `folder` (recursive, sorted) and every entry left out, with the reason."""
    files: list[str] = []
    skipped: list[Skipped] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        for d in sorted(dirnames):
            if is_ignored(d):
                skipped.append(Skipped(os.path.join(dirpath, d), _ignored_reason(d, True)))
            elif os.path.islink(os.path.join(dirpath, d)):  # os.walk does not follow it: say so
                skipped.append(
                    Skipped(
                        os.path.join(dirpath, d),
                        "symbolic link to a folder: not followed (move or link the image files themselves)",
                    )
                )
        dirnames[:] = sorted(d for d in dirnames if not is_ignored(d))
        for fn in sorted(filenames):
            path = os.path.join(dirpath, fn)
            if is_ignored(fn):
                skipped.append(Skipped(path, _ignored_reason(fn, False)))
            elif fn.lower().endswith(IMG_EXTENSIONS):
                files.append(path)
            else:
                skipped.append(Skipped(path, "not an image file extension"))
    return files, skipped


@dataclass
class ClassTree:
    """One folder of class subfolders: class names (sorted), (path, label) items, what was left out."""

    root: str
    classes: list[str]
    items: list[tuple[str, int]]
    skipped: list[Skipped] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Images per class."""
        c = Counter(y for _, y in self.items)
        return {name: c.get(i, 0) for i, name in enumerate(self.classes)}


def scan_tree(root: str | os.PathLike) -> ClassTree:
    """Scan one class tree: each subfolder is a class, its image files (recursively) the items."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Data folder {str(root)!r} does not exist or is not a folder.")
    skipped: list[Skipped] = []
    per_class: dict[str, list[str]] = {}
    for entry in sorted(root.iterdir()):
        if is_ignored(entry.name):
            skipped.append(Skipped(str(entry), _ignored_reason(entry.name, entry.is_dir())))
        elif not entry.is_dir():
            skipped.append(Skipped(str(entry), "file outside any class folder"))
        else:
            files, left_out = walk_images(entry)
            skipped += left_out
            if files:
                per_class[entry.name] = files
            else:
                skipped.append(Skipped(str(entry), "empty class folder (no images): class left out"))
    classes = sorted(per_class)
    items = [(p, i) for i, c in enumerate(classes) for p in per_class[c]]
    return ClassTree(str(root), classes, items, skipped)


@dataclass
class DatasetLayout:
    """A dataset folder as found on disk: its split folders (or one class tree) and its strays."""

    root: str
    trees: dict[str, ClassTree]  # split folder name -> tree; {"all": tree} for a single class tree
    train: str  # the tree training learns from: "train" or "all"
    val: str | None  # the tree training validates on (the first of VAL_DIR_NAMES present), if any
    stray: list[Skipped] = field(default_factory=list)  # entries beside the split folders

    @property
    def description(self) -> str:
        """'train/ + val/' or 'single class tree'."""
        if self.train == "all":
            return "single class tree"
        return " + ".join(f"{name}/" for name in self.trees)

    @property
    def skipped(self) -> list[Skipped]:
        """Everything left out: strays and what each tree skipped."""
        return self.stray + [s for t in self.trees.values() for s in t.skipped]


def scan_dataset(root: str | os.PathLike) -> DatasetLayout:
    """Scan a dataset folder: train/ with val-like siblings, or one class tree."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"Data folder {str(root)!r} does not exist. Pass a folder with train/ and val/ "
            "class subfolders, or one folder of class subfolders."
        )
    if not (root / "train").is_dir():
        return DatasetLayout(str(root), {"all": scan_tree(root)}, "all", None)
    names = ["train"] + [n for n in VAL_DIR_NAMES if (root / n).is_dir()]
    stray = []
    for entry in sorted(root.iterdir()):
        if entry.name in names:
            continue
        reason = (
            _ignored_reason(entry.name, entry.is_dir())
            if is_ignored(entry.name)
            else "outside the split folders (ignored)"
        )
        stray.append(Skipped(str(entry), reason))
    trees = {n: scan_tree(root / n) for n in names}
    return DatasetLayout(str(root), trees, "train", names[1] if len(names) > 1 else None, stray)


def image_paths(inputs: Iterable) -> list[str]:
    """expand_inputs for commands that must find at least one image: DataError naming what was found."""
    inputs = list(inputs)
    paths, skipped = expand_inputs(inputs)
    if not paths:
        seen = "; ".join(f"{s.path} ({s.reason})" for s in skipped[:5]) or "nothing at all"
        raise DataError(
            f"No image files in {', '.join(map(str, inputs))}: found {seen}. Image files end in "
            f"{', '.join(IMG_EXTENSIONS)}."
        )
    return paths


def expand_inputs(inputs: Iterable) -> tuple[list[str], list[Skipped]]:
    """Files as given, folders expanded to their image files (the same walk as datasets)."""
    out: list[str] = []
    skipped: list[Skipped] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files, left_out = walk_images(p)
            out += files
            skipped += left_out
        elif p.exists():
            out.append(str(p))
        else:
            raise DataError(f"{str(p)!r} does not exist: pass image files or folders of images.")
    return out, skipped


# ----------------------------------------------------------------------------- the training split


@dataclass
class DataSplit:
    """Class names and the (path, label) items of each split, plus what was left out."""

    classes: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    layout: str
    skipped: list[Skipped] = field(default_factory=list)
    root: str = ""  # the dataset folder (what `headstart doctor` is pointed at)

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
            "root": self.root,
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
            root=d.get("root", ""),
        )


def resolve_data(
    data: str | os.PathLike,
    *,
    val: str | os.PathLike | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
) -> DataSplit:
    """The training split of a dataset folder in any supported layout (see the module docstring)."""
    layout = scan_dataset(data)
    train = layout.trees[layout.train]
    vtree = scan_tree(val) if val is not None else layout.trees[layout.val] if layout.val else None
    unused = [t for t in layout.trees.values() if t is not train and t is not vtree]
    skipped = layout.stray + train.skipped + (vtree.skipped if vtree else [])
    skipped += [
        Skipped(t.root, f"split folder not used by training (validation: {vtree.root})") for t in unused
    ]
    if vtree is not None:
        vitems = _remap(vtree, train.classes, vtree.root)
        name = "separate validation folder" if val is not None else f"train/ + {layout.val}/"
    else:
        _check_classes(train.classes, train.root)
        tr, vitems = stratified_split(train.items, val_fraction, seed)
        train = ClassTree(train.root, train.classes, tr, train.skipped)
        name = f"single class tree, stratified {1 - val_fraction:.0%}/{val_fraction:.0%} split"
    _check_classes(train.classes, str(data))
    if not vitems:
        raise DataError(f"No validation images found for {str(data)!r} ({name}).")
    return DataSplit(train.classes, train.items, vitems, name, skipped, str(data))


def _remap(vtree: ClassTree, classes: list[str], where: str | os.PathLike) -> list[tuple[str, int]]:
    """Validation items labelled by the training classes' indices (matched by folder name)."""
    unknown = sorted(set(vtree.classes) - set(classes))
    if unknown:
        raise DataError(
            f"Validation folder {str(where)!r} has classes not in training: {unknown}. "
            f"Training classes are {classes}; rename or remove those folders."
        )
    return [(p, classes.index(vtree.classes[y])) for p, y in vtree.items]


def _check_classes(classes: list[str], where: str) -> None:
    if len(classes) < 2:
        raise DataError(
            f"Found {len(classes)} class folder(s) with images in {where!r}; a classifier "
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


def dataset_items(data: str | os.PathLike, classes: list[str]) -> list[tuple[str, int]]:
    """Labelled images to evaluate on: a class tree, or the val split of a train/val folder,
    labelled by the model's `classes` (a class the model does not know is an error)."""
    layout = scan_dataset(data)
    tree = layout.trees[layout.val] if layout.val else layout.trees[layout.train]
    unknown = sorted(set(tree.classes) - set(classes))
    if unknown:
        raise DataError(
            f"{str(data)!r} has classes the model was not trained on: {unknown}. The model knows {classes}."
        )
    return _remap(tree, classes, tree.root)
