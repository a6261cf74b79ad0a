"""`headstart bench` reports positive images/s for inference and training steps."""

from __future__ import annotations

from headstart.bench import bench

from conftest import TINY, run_cli


def test_bench_api_and_cli():
    r = bench(TINY, batch_size=4, min_seconds=0.05)
    assert r["device"] in ("cpu", "cuda", "mps") and r["input_size"] == 160
    for key in ("inference_img_s", "train_finetune2_img_s", "train_full_img_s"):
        assert r[key] > 0
    out = run_cli("bench", TINY, "--batch-size", "2", "--seconds", "0.05")
    assert out.returncode == 0, out.stderr
    assert "inference" in out.stdout and "images/s" in out.stdout
