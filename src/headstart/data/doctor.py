"""`headstart doctor DATA`: what is wrong with a dataset folder, before a run trips over it.

One pass over every file (threads; JPEGs decoded at 1/8 scale, which still reads the whole
stream, so truncation is caught): counts per class and split, unusable files with the reason,
files that will be converted and how, tiny images, odd formats and graphic-like images, exact
(content hash) and near (dHash) duplicates within a class, across classes and across splits, and
stray files. `quarantine` moves the unusable files aside, keeping relative paths; nothing is deleted.
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

from PIL import Image

from headstart.core.device import available_cores
from headstart.core.errors import ConfigError
from headstart.core.files import read_json, write_json
from headstart.core.metrics import balanced_class_weights
from headstart.data.inspect import NEAR_BITS, FileReport, inspect_file, near_duplicate_groups
from headstart.data.layout import scan_dataset

MANIFEST = "quarantine.json"


@dataclass
class DoctorReport:
    """The whole diagnosis; `to_dict` is the --json output."""

    root: str
    layout: str
    input_size: int
    tiny_fraction: float
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

    @property
    def min_side(self) -> int:
        """Images with a shorter side below this are reported as tiny."""
        return int(self.input_size * self.tiny_fraction)


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
    layout = scan_dataset(data)  # the same scan training uses
    root = Path(layout.root)
    files = [
        FileReport(p, split, tree.classes[y]) for split, tree in layout.trees.items() for p, y in tree.items
    ]
    files = _inspect_all(files, want_hash=duplicates, workers=workers)
    rel = lambda p: os.path.relpath(p, root)  # noqa: E731
    good = [f for f in files if f.error is None]
    counts: dict[str, dict[str, int]] = {}
    for f in good:
        counts.setdefault(f.split, {}).setdefault(f.label, 0)
        counts[f.split][f.label] += 1
    counts = {s: dict(sorted(c.items())) for s, c in counts.items()}
    base = counts.get("train") or counts.get("all") or {}
    weights = balanced_class_weights(list(base.values()))
    report = DoctorReport(
        root=str(root),
        layout=layout.description,
        input_size=input_size,
        tiny_fraction=tiny_fraction,
        seconds=0.0,
        counts=counts,
        imbalance_ratio=round(max(base.values()) / min(base.values()), 3) if len(base) > 1 else None,
        class_weights={c: round(float(w), 4) for c, w in zip(base, weights, strict=True)},
        formats=dict(Counter(f.format or "unreadable" for f in files).most_common()),
        unusable=[{"path": rel(f.path), "reason": f.error} for f in files if f.error],
        converted=[{"path": rel(f.path), "how": "; ".join(f.conversions)} for f in good if f.conversions],
        notes=[{"path": rel(f.path), "note": "; ".join(f.notes)} for f in good if f.notes],
        tiny=[],
        duplicates=_duplicates(good, rel, near_bits) if duplicates else [],
        stray=[
            {"path": rel(s.path) if s.path != str(root) else ".", "reason": s.reason} for s in layout.skipped
        ],
        files_scanned=len(files),
    )
    report.tiny = [
        {"path": rel(f.path), "size": f"{f.width}x{f.height}"}
        for f in good
        if min(f.width, f.height) < report.min_side
    ]
    report.seconds = round(time.perf_counter() - t0, 3)
    return report


def _inspect_all(files: list[FileReport], *, want_hash: bool, workers: int | None) -> list[FileReport]:
    """inspect_file on every file, in parallel."""
    cores = available_cores()
    inspect = partial(inspect_file, want_hash=want_hash)
    with warnings.catch_warnings():  # bombs are detected from the header, by size, not warned
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        if len(files) > 2000 and cores > 1:  # small files: per-file Python work, use processes
            with ProcessPoolExecutor(workers or min(8, cores)) as pool:
                return list(pool.map(inspect, files, chunksize=256))
        with ThreadPoolExecutor(workers or min(8, cores * 2)) as pool:  # Pillow releases the GIL
            list(pool.map(inspect, files))
    return files


def _groups_of(keys: list) -> list[list[int]]:
    by: dict = defaultdict(list)
    for i, k in enumerate(keys):
        by[k].append(i)
    return [g for g in by.values() if len(g) > 1]


def _duplicates(good: list[FileReport], rel, near_bits: int) -> list[dict]:
    """Exact (content hash) and near (dHash + pHash) duplicate groups, leaking ones first."""
    if len(good) < 2:
        return []
    dups: list[dict] = []
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
    return sorted(dups, key=lambda d: (order.get(d["scope"], 0), d["kind"], d["files"]))


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
        moved.append(
            {
                "from": str(src),
                "to": str(target),
                "reason": item["reason"],
                "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
        )
    if moved:
        manifest = dest / MANIFEST
        old = read_json(manifest)["moved"] if manifest.exists() else []
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

    section(
        "unusable files",
        r.unusable,
        "reason",
        "training skips these; `headstart doctor DATA --quarantine DIR` moves them aside",
    )
    section("will be converted to RGB", r.converted, "how")
    section("unusual files", r.notes, "note")
    section(
        f"tiny images (short side < {r.min_side} px for {r.input_size} px input)",
        r.tiny,
        "size",
        "upscaled a lot: check they are usable",
    )
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
