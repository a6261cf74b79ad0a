"""Builders of broken and unusual image files, made in a temp folder by the tests (never committed)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import COLORS


def noisy(color: tuple[int, int, int], size: tuple[int, int] = (40, 40), seed: int = 0) -> np.ndarray:
    """An HxWx3 uint8 array dominated by `color`."""
    rng = np.random.default_rng(seed)
    w, h = size
    return np.clip(np.array(color)[None, None, :] + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)


def truncated_jpeg(path: Path, color=COLORS["red"]) -> None:
    """A JPEG cut in half: the header parses, decoding fails."""
    buf = io.BytesIO()
    Image.fromarray(noisy(color, (64, 64), seed=15)).save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    path.write_bytes(data[: len(data) // 2])


def zero_bytes(path: Path) -> None:
    """An empty file."""
    path.write_bytes(b"")


def text_as_jpg(path: Path) -> None:
    """A text file with an image extension."""
    path.write_text("this is not an image, just a note saved with the wrong name\n")


def cmyk_jpeg(path: Path, color=COLORS["red"]) -> None:
    """A CMYK JPEG (as print workflows produce)."""
    Image.fromarray(noisy(color, seed=11)).convert("CMYK").save(path, "JPEG", quality=95)


def png16(path: Path, level: int = 40000) -> None:
    """A 16-bit greyscale PNG of constant `level` (0..65535)."""
    arr = np.full((40, 40), level, dtype=np.uint16)
    Image.fromarray(arr).save(path)  # uint16 -> mode I;16


def palette_transparent_png(path: Path, color=COLORS["red"]) -> None:
    """A palette PNG whose index 0 is transparent (left half transparent)."""
    img = Image.fromarray(noisy(color, seed=13)).quantize(colors=16)
    img.paste(0, (0, 0, 20, 40))
    img.save(path, transparency=0)


def rgba_png(path: Path, color=COLORS["red"]) -> None:
    """An RGBA PNG with a half-transparent alpha."""
    rgba = np.dstack([noisy(color, seed=12), np.full((40, 40), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(path)


def exif_rotated_jpeg(path: Path, color=COLORS["red"]) -> None:
    """A 60x30 (WxH) JPEG with EXIF orientation 6: viewers show it 30x60, rotated 90 deg clockwise."""
    img = Image.fromarray(noisy(color, (60, 30), seed=14))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(path, "JPEG", exif=exif.tobytes(), quality=95)


def huge_png_header(path: Path, side: int = 100_000) -> None:
    """A tiny file whose PNG header claims side x side pixels: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


BROKEN = {
    "truncated.jpg": truncated_jpeg,
    "zero.jpg": zero_bytes,
    "notes.jpg": text_as_jpg,
    "bomb.png": huge_png_header,
}
CONVERTED = {
    "cmyk.jpg": cmyk_jpeg,
    "deep16.png": png16,
    "palette alpha.png": palette_transparent_png,
    "rgba.png": rgba_png,
    "rotated.jpg": exif_rotated_jpeg,
    "café ñoño 例.png": lambda p: Image.fromarray(noisy(COLORS["red"], seed=77)).save(p),
}


def make_bad_tree(root: Path, *, per_class: int = 12, seed: int = 0) -> dict[str, list[Path]]:
    """root/train/{red,green}, root/val/{red,green}, an empty class folder and every odd file.

    Returns {"broken": [...], "converted": [...], "empty": [folder]}.
    """
    from conftest import make_class_tree

    make_class_tree(root / "train", per_class=per_class, seed=seed)
    make_class_tree(root / "val", per_class=4, seed=seed + 500)
    broken, converted = [], []
    for name, build in BROKEN.items():
        p = root / "train" / "red" / name
        build(p)
        broken.append(p)
    for name, build in CONVERTED.items():
        p = root / "train" / "red" / name
        build(p)
        converted.append(p)
    empty = root / "train" / "purple"
    empty.mkdir()
    return {"broken": broken, "converted": converted, "empty": [empty]}
