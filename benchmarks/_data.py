"""Where the benchmarks find the shared data: $HEADSTART_DATA, else ../shared/data beside the repo."""

from __future__ import annotations

import os
from pathlib import Path

DATA = Path(os.environ.get("HEADSTART_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
HYMENOPTERA = str(DATA / "hymenoptera_data")
CIFAR_TAR = str(DATA / "cifar10.tar.gz")
