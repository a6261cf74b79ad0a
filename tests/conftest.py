"""Shared fixtures: no network, tiny generated image folders, a tiny backbone, real-data paths."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# ../shared/data beside the project (CI and clones); HEADSTART_DATA overrides; a parent's
# shared/data is found too, so git worktrees nested deeper still reach it.
SHARED_DATA = Path(
    os.environ.get("HEADSTART_DATA")
    or next(
        (p / "shared" / "data" for p in ROOT.parents if (p / "shared" / "data").is_dir()),
        ROOT.parent / "shared" / "data",
    )
)
HYMENOPTERA = SHARED_DATA / "hymenoptera_data"
NETBLOCK = Path(__file__).parent / "netblock"
# A tiny timm model (~100k params, random init) keeps unit tests fast.
TINY = "timm:test_efficientnet"


@pytest.fixture(autouse=True, scope="session")
def _private_feature_cache(tmp_path_factory):
    """The suite never reads or fills the user's feature cache."""
    os.environ["HEADSTART_CACHE"] = str(tmp_path_factory.mktemp("feature-cache"))


@pytest.fixture(autouse=True)
def _restore_headstart_logger():
    """A CLI call in this process configures headstart's logger; later tests get the library default."""
    log = logging.getLogger("headstart")
    saved = (list(log.handlers), log.level, log.propagate)
    yield
    log.handlers[:], log.propagate = saved[0], saved[2]
    log.setLevel(saved[1])


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every test runs with outgoing connections refused (loopback allowed for local servers)."""
    orig = socket.socket.connect

    def refuse(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if self.family == socket.AF_UNIX or host in ("127.0.0.1", "localhost", "::1"):
            return orig(self, address)
        raise RuntimeError(f"network access blocked in tests: connect to {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for `python -m headstart` subprocesses: network blocked, this source tree first."""
    env = dict(os.environ)
    path = [str(NETBLOCK), str(ROOT / "src"), env.get("PYTHONPATH", "")]
    env.update(PYTHONPATH=os.pathsep.join(p for p in path if p), HEADSTART_BLOCK_NETWORK="1",
               HF_HUB_OFFLINE="1", **extra)  # fmt: skip
    return env


def run_cli(*args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh process with the network blocked."""
    return subprocess.run(
        [sys.executable, "-m", "headstart", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=cli_env(**env),
    )  # fmt: skip


def make_image(path: Path, color: tuple[int, int, int], size: int = 40, seed: int = 0) -> None:
    """A small noisy image dominated by `color`: easy to learn, not trivially identical."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(color)[None, None, :] + rng.normal(0, 25, (size, size, 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def make_class_tree(root: Path, classes=("red", "green"), per_class: int = 12, ext=".png", seed=0):
    """root/<class>/<i>.png with colour-coded classes."""
    for ci, c in enumerate(classes):
        for i in range(per_class):
            make_image(root / c / f"{i:03d}{ext}", COLORS[c], seed=seed + 1000 * ci + i)
    return root


@pytest.fixture
def tiny_split(tmp_path) -> Path:
    """DATA/train/{red,green} and DATA/val/{red,green} of small PNGs."""
    make_class_tree(tmp_path / "data" / "train", per_class=12)
    make_class_tree(tmp_path / "data" / "val", per_class=5, seed=500)
    return tmp_path / "data"


@pytest.fixture
def tiny_tree(tmp_path) -> Path:
    """One class tree of three colour classes, no train/val split."""
    return make_class_tree(tmp_path / "tree", classes=("red", "green", "blue"), per_class=10)


@pytest.fixture
def hymenoptera() -> Path:
    """The real ant/bee set beside the project; skip only where the shared data is absent."""
    if not HYMENOPTERA.is_dir():
        pytest.skip(f"{HYMENOPTERA} not present")
    return HYMENOPTERA


def real_data_dir() -> Path:
    """Shared real data: $HEADSTART_DATA, else ../shared/data beside the repo (or a parent's)."""
    return SHARED_DATA


@pytest.fixture(scope="session")
def hymenoptera_run(tmp_path_factory) -> Path:
    """An extract run (embedded lite0) on the real ant/bee set, trained once per test session."""
    data = real_data_dir() / "hymenoptera_data"
    if not data.is_dir():
        pytest.skip(f"{data} not present (set HEADSTART_DATA)")
    import headstart

    out = tmp_path_factory.mktemp("hymenoptera") / "run"
    headstart.train(str(data), output=str(out), strategy="extract", seed=0)
    return out
