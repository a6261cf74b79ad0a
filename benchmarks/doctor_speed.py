"""headstart doctor vs a naive scan (open, full decode, RGB, SHA-256, dHash; one thread) on a folder.

Usage: python benchmarks/doctor_speed.py [DATA]   (default: the ant/bee set)
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

from _data import HYMENOPTERA
from PIL import Image

from headstart.data.doctor import diagnose
from headstart.data.inspect import dhash


def naive(root: Path) -> int:
    n = 0
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        hashlib.sha256(p.read_bytes()).hexdigest()
        try:
            with Image.open(p) as img:
                dhash(img.convert("RGB"))
            n += 1
        except Exception:  # noqa: BLE001
            pass
    return n


def main() -> None:
    default = Path(HYMENOPTERA)
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else default
    diagnose(root)  # warm the page cache for both
    t = time.perf_counter()
    r = diagnose(root)
    t_doc = time.perf_counter() - t
    t = time.perf_counter()
    n = naive(root)
    t_naive = time.perf_counter() - t
    print(f"{root}: {r.files_scanned} files")
    print(f"headstart doctor (all checks): {t_doc:.2f}s  ({r.files_scanned / t_doc:.0f} files/s)")
    print(f"naive decode+hash scan:        {t_naive:.2f}s  ({n / t_naive:.0f} files/s)")
    print(f"speed-up: {t_naive / t_doc:.1f}x")


if __name__ == "__main__":
    main()
