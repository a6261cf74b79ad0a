"""One image file, looked at closely: format, mode, conversions, oddities and perceptual hashes;
and near-duplicate grouping of those hashes (pigeonhole banding, not all n^2 pairs)."""

from __future__ import annotations

import hashlib
import io
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from headstart.data.images import explain_failure, to_rgb

FEW_COLOURS = 64  # a photo has thousands of distinct colours; a placeholder or icon has a few
# Near duplicates: dHash within 4 bits AND pHash within 8 bits (of 64). dHash alone chains flat,
# dark images of different classes together on CIFAR-10; with pHash as well, none conflict.
NEAR_BITS = 4
NEAR_PBITS = 8


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


def inspect_file(fr: FileReport, *, want_hash: bool = True) -> FileReport:
    """Open, fully decode (small) and fingerprint one file; fills `fr` in place."""
    path = fr.path
    try:
        fr.bytes = os.path.getsize(path)
        source: str | io.BytesIO = path
        if want_hash:  # read once: the same bytes are hashed and decoded
            with open(path, "rb") as f:
                data = f.read()
            fr.sha256 = hashlib.sha256(data).hexdigest()
            source = io.BytesIO(data)
        with Image.open(source) as img:
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
            ii, jj = np.nonzero(np.triu(popcount(h[idx, None] ^ h[None, idx]) <= max_bits, 1))
            ii, jj = idx[ii], idx[jj]
            if ph is not None:  # confirm the dHash candidates with pHash
                ok = popcount(ph[ii] ^ ph[jj]) <= max_pbits
                ii, jj = ii[ok], jj[ok]
            for i, j in zip(ii.tolist(), jj.tolist(), strict=True):
                parent[find(i)] = find(j)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(n):
        groups[find(i)].append(i)
    return [g for g in groups.values() if len(g) > 1]


def popcount(x: np.ndarray) -> np.ndarray:
    """Set bits per element of a uint64 array (np.bitwise_count where NumPy >= 2 has it)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    x = np.ascontiguousarray(x, dtype=np.uint64)
    return np.unpackbits(x.view(np.uint8).reshape(*x.shape, 8), axis=-1).sum(-1)
