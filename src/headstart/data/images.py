"""Opening image files safely: any mode to RGB, EXIF orientation, bombs refused, failures explained."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not grey pixels


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
