"""`headstart doctor DATA`: what is wrong with a dataset folder, before a run trips over it.

One pass over every file (threads; JPEGs decoded at 1/8 scale, which still reads the whole
stream, so truncation is caught): counts per class and split, unusable files with the reason,
files that will be converted and how, tiny images, odd formats and graphic-like images, exact
(content hash) and near (dHash) duplicates within a class, across classes and across splits, and
stray files. `quarantine` moves the unusable files aside, keeping relative paths; nothing is deleted.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from headstart.data import IGNORED_NAMES, IMG_EXTENSIONS, VAL_DIR_NAMES, explain_failure, to_rgb
from headstart.device import available_cores
from headstart.errors import ConfigError, DataError

FEW_COLOURS = 64  # a photo has thousands of distinct colours; a placeholder or icon has a few
# Near duplicates: dHash within 4 bits AND pHash within 8 bits (of 64). dHash alone chains flat,
# dark images of different classes together on CIFAR-10; with pHash as well, none conflict.
NEAR_BITS = 4
NEAR_PBITS = 8
MANIFEST = "quarantine.json"


@dataclass
class FileReport:
    """What the doctor learnt about one image file."""

    path: str
    split: str
    label: str
    bytes: int = 0
    format: str | None = None
    mode: str | None = None
    width: int = 0
    height: int = 0
    frames: int = 1
    conversions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    sha256: str | None = None
    dhash: int | None = None
    phash: int | None = None


@dataclass
class DoctorReport:
    """The whole diagnosis; `to_dict` is the --json output."""

    root: str
    layout: str
    input_size: int
    seconds: float
    counts: dict[str, dict[str, int]]  # split -> class -> usable images
    imbalance_ratio: float | None
    class_weights: dict[str, float]
    formats: dict[str, int]
    unusable: list[dict]
    converted: list[dict]
    notes: list[dict]
    tiny: list[dict]
    duplicates: list[dict]
    stray: list[dict]
    files_scanned: int

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return asdict(self)

    @property
    def problems(self) -> int:
        """Files that cannot be used plus duplicate groups that leak or conflict."""
        bad_dups = [d for d in self.duplicates if d["scope"] != "within class"]
        return len(self.unusable) + len(bad_dups)


# ----------------------------------------------------------------------------- scanning


def _ignored(name: str) -> bool:
    return name.startswith(".") or name in IGNORED_NAMES


def find_splits(root: Path) -> tuple[str, dict[str, Path]]:
    """Layout and split folders: train/ + val-like folders, or one class tree ('all')."""
    if (root / "train").is_dir():
        splits = {"train": root / "train"}
        splits |= {n: root / n for n in VAL_DIR_NAMES if (root / n).is_dir()}
        return " + ".join(f"{n}/" for n in splits), splits
    return "single class tree", {"all": root}


def scan(root: Path) -> tuple[str, list[FileReport], list[dict], dict[str, list[str]]]:
    """Walk the dataset: image candidates, stray entries, and class names per split."""
    layout, splits = find_splits(root)
    files: list[FileReport] = []
    stray: list[dict] = []
    classes: dict[str, list[str]] = {}

    def stray_entry(p: Path, why: str) -> None:
        stray.append({"path": str(p), "reason": why})

    if layout != "single class tree":
        for p in sorted(root.iterdir()):
            if p.name not in splits:
                stray_entry(p, _stray_reason(p, "outside the split folders (ignored)"))
    for split, sdir in splits.items():
        classes[split] = []
        for cdir in sorted(sdir.iterdir()):
            if not cdir.is_dir() or _ignored(cdir.name):
                stray_entry(cdir, _stray_reason(cdir, "file outside any class folder (ignored)"))
                continue
            n_images = 0
            for dirpath, dirnames, filenames in os.walk(cdir):
                for d in sorted(n for n in dirnames if _ignored(n)):
                    stray_entry(Path(dirpath) / d, _stray_reason(Path(dirpath) / d, ""))
                dirnames[:] = sorted(n for n in dirnames if not _ignored(n))
                for fn in sorted(filenames):
                    p = Path(dirpath) / fn
                    if _ignored(fn):
                        stray_entry(p, _stray_reason(p, ""))
                    elif fn.lower().endswith(IMG_EXTENSIONS):
                        files.append(FileReport(str(p), split, cdir.name))
                        n_images += 1
                    else:
                        stray_entry(p, f"not an image extension ({p.suffix or 'none'}): ignored by training")
            if n_images:
                classes[split].append(cdir.name)
            else:
                stray_entry(cdir, "empty class folder (no images): the class is left out")
    return layout, files, stray, classes


def _stray_reason(p: Path, default: str) -> str:
    if p.name == "__MACOSX":
        return "macOS archive metadata folder (__MACOSX): ignored; safe to delete"
    if p.name == ".DS_Store":
        return "macOS Finder file (.DS_Store): ignored"
    if p.name in IGNORED_NAMES:
        return f"system file ({p.name}): ignored"
    if p.name.startswith("."):
        return f"hidden {'folder' if p.is_dir() else 'file'}: ignored"
    return default


def inspect_file(fr: FileReport, *, want_hash: bool = True) -> FileReport:
    """Open, fully decode (small) and fingerprint one file; fills `fr` in place."""
    path = fr.path
    try:
        fr.bytes = os.path.getsize(path)
        with open(path, "rb") as f:
            data = f.read()
        if want_hash:
            fr.sha256 = hashlib.sha256(data).hexdigest()
        with Image.open(path) as img:
            fr.format, fr.mode, (fr.width, fr.height) = img.format, img.mode, img.size
            fr.frames = getattr(img, "n_frames", 1)
            if fr.width * fr.height > Image.MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombWarning(
                    f"Image size ({fr.width * fr.height} pixels) exceeds limit of "
                    f"{Image.MAX_IMAGE_PIXELS} pixels, could be decompression bomb DOS attack."
                )
            fr.conversions = _conversions(img)
            if img.format == "JPEG":
                img.draft("RGB", (64, 64))
            orientation = img.getexif().get(0x0112, 1)
            img.load()
            if orientation not in (1, None):
                fr.conversions.append(f"EXIF-rotated (orientation {orientation})")
                img = ImageOps.exif_transpose(img)
            rgb = to_rgb(img)
            colours = rgb.getcolors(FEW_COLOURS)  # None when there are more
        fr.notes = _notes(fr, path, colours)
        if want_hash:
            fr.dhash, fr.phash = dhash(rgb), phash(rgb)
    except Exception as e:  # noqa: BLE001 - every failure is a finding, reported with its reason
        fr.error = explain_failure(path, e)
    return fr


def _conversions(img: Image.Image) -> list[str]:
    m = img.mode
    transparent = "transparency" in img.info
    if m == "P":
        return [f"palette {'with' if transparent else 'without'} transparency -> RGB"
                + (" (transparent pixels on white)" if transparent else "")]  # fmt: skip
    table = {
        "1": "1-bit black and white -> RGB",
        "L": "grayscale -> RGB (3 equal channels)",
        "LA": "grayscale with alpha -> RGB on white",
        "RGBA": "RGBA -> RGB (alpha composited on white)",
        "CMYK": "CMYK -> RGB",
        "YCbCr": "YCbCr -> RGB",
        "LAB": "LAB -> RGB",
        "I": "32-bit integer -> 8-bit RGB (scaled)",
        "F": "32-bit float -> 8-bit RGB (scaled)",
    }
    if m.startswith("I;16"):
        return ["16-bit -> 8-bit RGB (scaled, not clipped)"]
    out = [table[m]] if m in table else ([] if m == "RGB" else [f"{m} -> RGB"])
    if m == "L" and transparent:
        out = ["grayscale with transparency -> RGB on white"]
    return out


def _notes(fr: FileReport, path: str, colours) -> list[str]:
    notes = []
    ext = Path(path).suffix.lower().lstrip(".")
    fmt = (fr.format or "").lower()
    same = {"jpg": "jpeg", "tif": "tiff", "pgm": "ppm"}
    if fmt and same.get(ext, ext) != fmt and not (ext in ("pgm", "ppm") and fmt == "ppm"):
        notes.append(f"extension .{ext} but the content is {fr.format} (it still loads)")
    if fr.frames > 1:
        notes.append(f"animated/multi-frame {fr.format} ({fr.frames} frames): only the first is used")
    elif fmt == "gif":
        notes.append("GIF: an unusual format for photos (256-colour palette)")
    if colours is not None:
        top = max(c for c, _ in colours) / max(1, sum(c for c, _ in colours))
        share = f", {top:.0%} of pixels one colour" if top >= 0.5 else ""
        notes.append(
            f"only {len(colours)} distinct colours{share}: a graphic, placeholder or blank image "
            "rather than a photo?"
        )
    return notes


def dhash(img: Image.Image) -> int:
    """64-bit difference hash: sign of horizontal gradients of a 9x8 grayscale thumbnail."""
    g = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (g[:, 1:] > g[:, :-1]).reshape(-1)
    return int(np.packbits(bits).view(">u8")[0])


def _dct_matrix(n: int = 32) -> np.ndarray:
    k = np.arange(n)
    m = np.cos(np.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * np.sqrt(2 / n)
    m[0] /= np.sqrt(2)
    return m


_DCT32 = _dct_matrix(32)


def phash(img: Image.Image) -> int:
    """64-bit perceptual hash: low 8x8 DCT coefficients of a 32x32 grayscale thumbnail vs their median."""
    g = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float64)
    low = (_DCT32 @ g @ _DCT32.T)[:8, :8].reshape(-1)
    bits = low > np.median(low[1:])  # the DC term only says how bright the image is
    bits[0] = False
    return int(np.packbits(bits).view(">u8")[0])


# ----------------------------------------------------------------------------- analysis


def _groups_of(keys: list) -> list[list[int]]:
    by: dict = defaultdict(list)
    for i, k in enumerate(keys):
        by[k].append(i)
    return [g for g in by.values() if len(g) > 1]


def near_duplicate_groups(
    dhashes: list[int],
    phashes: list[int] | None = None,
    *,
    max_bits: int = NEAR_BITS,
    max_pbits: int = NEAR_PBITS,
) -> list[list[int]]:
    """Connected groups of images whose dHashes (and pHashes, if given) are within the limits."""
    n = len(dhashes)
    if n < 2:
        return []
    h = np.array(dhashes, dtype=np.uint64)
    ph = np.array(phashes, dtype=np.uint64) if phashes is not None else None
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    # Pigeonhole: hashes within max_bits of each other agree exactly on at least one of
    # max_bits + 1 bands, so only pairs sharing a band value are compared (not all n^2 pairs).
    n_bands = max_bits + 1
    edges = np.linspace(0, 64, n_bands + 1).astype(int)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        band = (h >> np.uint64(lo)) & np.uint64((1 << int(hi - lo)) - 1)
        order = np.argsort(band, kind="stable")
        cuts = np.flatnonzero(np.diff(band[order])) + 1
        for idx in np.split(order, cuts):
            if len(idx) < 2:
                continue
            ii, jj = np.nonzero(np.triu(np.bitwise_count(h[idx, None] ^ h[None, idx]) <= max_bits, 1))
            ii, jj = idx[ii], idx[jj]
            if ph is not None:  # confirm the dHash candidates with pHash
                ok = np.bitwise_count(ph[ii] ^ ph[jj]) <= max_pbits
                ii, jj = ii[ok], jj[ok]
            for i, j in zip(ii.tolist(), jj.tolist(), strict=True):
                parent[find(i)] = find(j)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(n):
        groups[find(i)].append(i)
    return [g for g in groups.values() if len(g) > 1]


def _scope(members: list[FileReport]) -> str:
    splits = {m.split for m in members}
    labels = {m.label for m in members}
    if len(splits) > 1 and len(labels) > 1:
        return "leakage and conflicting labels"
    if len(splits) > 1:
        return "train/val leakage"
    if len(labels) > 1:
        return "conflicting labels (across classes)"
    return "within class"


def diagnose(
    data: str | os.PathLike,
    *,
    input_size: int = 224,
    tiny_fraction: float = 0.5,
    near_bits: int = NEAR_BITS,
    duplicates: bool = True,
    workers: int | None = None,
) -> DoctorReport:
    """Scan a dataset folder and report every problem found; reads files, never changes them."""
    t0 = time.perf_counter()
    root = Path(data)
    if not root.is_dir():
        raise DataError(f"Data folder {str(root)!r} does not exist or is not a folder.")
    layout, files, stray, _ = scan(root)
    cores = available_cores()
    inspect = partial(inspect_file, want_hash=duplicates)
    with warnings.catch_warnings():  # bombs are detected from the header, by size, not warned
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if len(files) > 2000 and cores > 1:  # small files: per-file Python work, use processes
            with ProcessPoolExecutor(workers or min(8, cores)) as pool:
                files = list(pool.map(inspect, files, chunksize=256))
        else:  # Pillow decodes with the GIL released; threads start at once
            with ThreadPoolExecutor(workers or min(8, cores * 2)) as pool:
                list(pool.map(inspect, files))

    rel = lambda p: os.path.relpath(p, root)  # noqa: E731
    good = [f for f in files if f.error is None]
    counts: dict[str, dict[str, int]] = {}
    for f in good:
        counts.setdefault(f.split, {}).setdefault(f.label, 0)
        counts[f.split][f.label] += 1
    counts = {s: dict(sorted(c.items())) for s, c in counts.items()}
    base = counts.get("train") or counts.get("all") or {}
    imbalance = max(base.values()) / min(base.values()) if len(base) > 1 else None
    total = sum(base.values())
    weights = {c: round(total / (len(base) * n), 4) for c, n in base.items()} if base else {}

    dups: list[dict] = []
    if duplicates and len(good) > 1:
        exact = _groups_of([f.sha256 for f in good])
        exact_ids = {i for g in exact for i in g}
        for g in exact:
            members = [good[i] for i in g]
            dups.append({"kind": "exact", "scope": _scope(members), "files": [rel(m.path) for m in members]})
        # near duplicates among distinct files (one representative per exact group)
        reps = [i for i in range(len(good)) if i not in exact_ids] + [g[0] for g in exact]
        dh, ph = [good[i].dhash for i in reps], [good[i].phash for i in reps]
        for g in near_duplicate_groups(dh, ph, max_bits=near_bits):
            members = [good[reps[i]] for i in g]
            dups.append({"kind": "near", "scope": _scope(members), "files": [rel(m.path) for m in members]})
        order = {"within class": 1}
        dups.sort(key=lambda d: (order.get(d["scope"], 0), d["kind"], d["files"]))

    min_side = int(input_size * tiny_fraction)
    return DoctorReport(
        root=str(root),
        layout=layout,
        input_size=input_size,
        seconds=round(time.perf_counter() - t0, 3),
        counts=counts,
        imbalance_ratio=round(imbalance, 3) if imbalance else None,
        class_weights=weights,
        formats=dict(Counter(f.format or "unreadable" for f in files).most_common()),
        unusable=[{"path": rel(f.path), "reason": f.error} for f in files if f.error],
        converted=[{"path": rel(f.path), "how": "; ".join(f.conversions)} for f in good if f.conversions],
        notes=[{"path": rel(f.path), "note": "; ".join(f.notes)} for f in good if f.notes],
        tiny=[
            {"path": rel(f.path), "size": f"{f.width}x{f.height}"}
            for f in good
            if min(f.width, f.height) < min_side
        ],
        duplicates=dups,
        stray=[
            {"path": rel(s["path"]) if s["path"] != str(root) else ".", "reason": s["reason"]} for s in stray
        ],
        files_scanned=len(files),
    )


# ----------------------------------------------------------------------------- quarantine


def quarantine(report: DoctorReport, dest: str | os.PathLike) -> list[dict]:
    """Move the unusable files under `dest`, keeping relative paths, and append to its manifest."""
    root, dest = Path(report.root).resolve(), Path(dest).resolve()
    if dest == root or root in dest.parents:
        raise ConfigError(
            f"--quarantine {str(dest)!r} is inside the dataset {str(root)!r}; training would read it "
            "as a class folder. Choose a folder outside the dataset."
        )
    moved = []
    for item in report.unusable:
        src = root / item["path"]
        target = dest / item["path"]
        n = 1
        while target.exists():  # never overwrite an earlier quarantined file
            target = target.with_name(f"{target.stem}.{n}{target.suffix}")
            n += 1
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(src), str(target))
        moved.append({"from": str(src), "to": str(target), "reason": item["reason"],
                      "time": datetime.now(timezone.utc).isoformat(timespec="seconds")})  # fmt: skip
    if moved:
        import json

        from headstart.runs import write_json

        manifest = dest / MANIFEST
        old = json.loads(manifest.read_text())["moved"] if manifest.exists() else []
        write_json(manifest, {"dataset": str(root), "moved": old + moved})
    return moved


# ----------------------------------------------------------------------------- text output


def format_report(r: DoctorReport, *, limit: int = 20) -> str:
    """The readable table form of a report."""
    out: list[str] = []
    add = out.append
    add(f"headstart doctor: {r.root}")
    fmts = ", ".join(f"{k} {v}" for k, v in r.formats.items())
    add(f"layout {r.layout}; {r.files_scanned} image files scanned in {r.seconds:.1f}s ({fmts})")
    add("")
    splits = list(r.counts)
    classes = sorted({c for s in r.counts.values() for c in s})
    w = max([len(c) for c in classes] + [5]) + 2
    add("images per class (usable)")
    add("  " + "class".ljust(w) + "".join(s.rjust(8) for s in splits))
    for c in classes:
        add("  " + c.ljust(w) + "".join(str(r.counts[s].get(c, 0)).rjust(8) for s in splits))
    add("  " + "total".ljust(w) + "".join(str(sum(r.counts[s].values())).rjust(8) for s in splits))
    if r.imbalance_ratio:
        wt = ", ".join(f"{c} {v:.3g}" for c, v in r.class_weights.items())
        add(f"  imbalance (largest/smallest class): {r.imbalance_ratio:.2f}; balanced class weights: {wt}")
        if r.imbalance_ratio >= 3:
            add("  -> consider `headstart train --class-weights balanced`")

    def section(title: str, rows: list[dict], key: str, hint: str = "") -> None:
        add("")
        add(f"{title} ({len(rows)}){': none' if not rows else ''}")
        for row in rows[:limit]:
            add(f"  {row['path']}  --  {row[key]}")
        if len(rows) > limit:
            add(f"  ... {len(rows) - limit} more (see --json)")
        if rows and hint:
            add(f"  -> {hint}")

    section("unusable files", r.unusable, "reason",
            "training skips these; `headstart doctor DATA --quarantine DIR` moves them aside")  # fmt: skip
    section("will be converted to RGB", r.converted, "how")
    section("unusual files", r.notes, "note")
    section(f"tiny images (short side < {int(r.input_size * 0.5)} px for {r.input_size} px input)",
            r.tiny, "size", "upscaled a lot: check they are usable")  # fmt: skip
    add("")
    add(f"duplicate groups ({len(r.duplicates)}){': none' if not r.duplicates else ''}")
    for d in r.duplicates[:limit]:
        add(f"  [{d['scope']}, {d['kind']}] " + "  =  ".join(d["files"]))
    if len(r.duplicates) > limit:
        add(f"  ... {len(r.duplicates) - limit} more (see --json)")
    if any(d["scope"] != "within class" for d in r.duplicates):
        add("  -> leakage inflates validation accuracy; conflicting labels teach noise: fix these first")
    section("stray files and folders", r.stray, "reason")
    add("")
    n_dup = sum(d["scope"] != "within class" for d in r.duplicates)
    add(
        f"summary: {sum(sum(c.values()) for c in r.counts.values())} usable images, "
        f"{len(r.unusable)} unusable, {len(r.converted)} converted, {len(r.notes)} unusual, "
        f"{len(r.tiny)} tiny, {len(r.duplicates)} duplicate groups ({n_dup} leaking or conflicting), "
        f"{len(r.stray)} stray"
    )
    return "\n".join(out)


def input_size_of(backbone: str | None) -> int:
    """The backbone's input size (224 when none is named), read without loading weights."""
    if not backbone:
        return 224
    from headstart.backbones import create_backbone

    return create_backbone(backbone, weights="none").config.input_size
