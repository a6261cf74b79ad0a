"""`headstart serve` under load vs `headstart predict` on the same images, in one run.

    python benchmarks/serve_load.py RUN FOLDER [--requests 2000] [--clients 32] [--bad 0.05]

Starts `headstart serve RUN` on loopback, then sends --requests POSTs of one image each (raw JPEG
bytes, read into memory first) from --clients concurrent httpx clients, twice: all good images,
then with a --bad share of bad uploads mixed in (not an image, truncated, empty, wrong content
type, in turn). Prints throughput, p50/p95/p99 latency and errors for each, and the ratio of the
server's throughput to batch prediction (`headstart predict`'s code path: Predictor.iter_predict,
decode in DataLoader workers) on the same image files in this process. The clients share the
machine with the server, as they would on a 2-core laptop.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

import numpy as np

BAD_KINDS = ("not_an_image", "truncated", "empty", "wrong_type")


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(run: str, port: int, extra: list[str]) -> subprocess.Popen:
    """`headstart serve` in a child process, returned once /readyz answers 200."""
    import httpx

    cmd = [sys.executable, "-m", "headstart", "serve", run, "--port", str(port), *extra]
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    for _ in range(1200):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return p
        except httpx.HTTPError:
            pass
        if p.poll() is not None:
            sys.exit(f"the server exited: {p.communicate()[1][-2000:]}")
        time.sleep(0.1)
    p.kill()
    sys.exit("the server was not ready within 120 s")


def body(good: bytes, kind: str | None) -> tuple[bytes, str]:
    """The request body and content type for a good image (kind None) or a kind of bad upload."""
    if kind is None:
        return good, "image/jpeg"
    return {
        "not_an_image": (b"%PDF-1.4 this is not a picture" * 20, "image/jpeg"),
        "truncated": (good[: len(good) // 3], "image/jpeg"),
        "empty": (b"", "image/jpeg"),
        "wrong_type": (good, "text/plain"),
    }[kind]


async def load(url: str, images: list[bytes], n: int, clients: int, bad: float) -> dict:
    """Send n requests from `clients` concurrent clients; latency and status of each."""
    import httpx

    rng = np.random.default_rng(0)
    kinds = [BAD_KINDS[i % len(BAD_KINDS)] if r < bad else None for i, r in enumerate(rng.random(n))]
    queue: asyncio.Queue = asyncio.Queue()
    for i, kind in enumerate(kinds):
        queue.put_nowait((i, kind))
    results: list[tuple[str | None, int, float]] = []

    async def client() -> None:
        async with httpx.AsyncClient(timeout=120) as c:
            while not queue.empty():
                i, kind = queue.get_nowait()
                data, ctype = body(images[i % len(images)], kind)
                t = time.perf_counter()
                try:
                    r = await c.post(url, content=data, headers={"Content-Type": ctype})
                    status = r.status_code
                except httpx.HTTPError:
                    status = 0  # no answer at all
                results.append((kind, status, time.perf_counter() - t))

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return {"wall": time.perf_counter() - t0, "results": results}


def describe(name: str, out: dict) -> float:
    """Print one phase; returns good images answered per second."""
    res = out["results"]
    good = [r for r in res if r[0] is None]
    lat = np.array([r[2] for r in good]) * 1000
    good_ok = sum(r[1] == 200 for r in good)
    bad = [r for r in res if r[0] is not None]
    bad_4xx = sum(400 <= r[1] < 500 for r in bad)
    server_errors = sum(r[1] >= 500 or r[1] == 0 for r in res)
    rate = good_ok / out["wall"]
    p50, p95, p99 = np.percentile(lat, [50, 95, 99])
    print(f"{name}: {len(res)} requests in {out['wall']:.1f}s: {rate:.1f} good images/s, "
          f"latency p50 {p50:.0f} ms, p95 {p95:.0f} ms, p99 {p99:.0f} ms")  # fmt: skip
    statuses = dict(Counter(r[1] for r in bad))
    print(f"  good: {good_ok}/{len(good)} answered 200; bad uploads: {bad_4xx}/{len(bad)} answered 4xx "
          f"({statuses}); server errors (5xx or no answer): {server_errors}")  # fmt: skip
    return rate


def main() -> None:
    """Measure predict, then the server without and with bad uploads; print the ratios."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("folder")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--bad", type=float, default=0.05, help="share of bad uploads in the second phase")
    ap.add_argument("--images", type=int, default=200, help="distinct images, cycled")
    ap.add_argument("--serve-args", default="", help="extra `headstart serve` options, e.g. '--max-batch 16'")
    a = ap.parse_args()

    import headstart
    from headstart.data.layout import expand_inputs

    paths, _ = expand_inputs([a.folder])
    paths = paths[: a.images]
    images = [open(p, "rb").read() for p in paths]  # noqa: SIM115 - small files, read once
    print(f"{len(paths)} distinct images from {a.folder}, {a.requests} requests, {a.clients} clients; "
          f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")  # fmt: skip

    predictor = headstart.load(a.run)
    cycled = [paths[i % len(paths)] for i in range(a.requests)]
    list(predictor.iter_predict(cycled[:64]))  # warm, like the server's warm-up
    t = time.perf_counter()
    n = sum(1 for _ in predictor.iter_predict(cycled))
    predict_rate = n / (time.perf_counter() - t)
    print(f"headstart predict (same {a.requests} image files, one process): {predict_rate:.1f} images/s")
    del predictor

    port = free_port()
    server = start(a.run, port, a.serve_args.split())
    url = f"http://127.0.0.1:{port}/v1/predict"
    try:
        asyncio.run(load(url, images, 64, a.clients, 0.0))  # connections and first batches
        clean = describe("serve, good images", asyncio.run(load(url, images, a.requests, a.clients, 0.0)))
        mixed = describe(
            f"serve, {a.bad:.0%} bad uploads", asyncio.run(load(url, images, a.requests, a.clients, a.bad))
        )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    print(f"ratio serve/predict throughput: {clean / predict_rate:.2f}x (goal >= 0.80); "
          f"with bad uploads {mixed / predict_rate:.2f}x")  # fmt: skip
    print(
        f"server exit code after SIGTERM: {server.returncode}; load average after: {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
