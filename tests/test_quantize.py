"""int8 export: the gate passes a normal calibration, refuses a broken one and leaves no file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import headstart
from headstart.deploy.export import export
from headstart.deploy.quantize import QuantizationGateError, quantize_int8

from conftest import TINY, make_class_tree, run_cli

pytest.importorskip("onnxruntime", reason="int8 export needs the onnx extra: pip install 'headstart[onnx]'")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A tiny three-colour run and its float ONNX export."""
    root = tmp_path_factory.mktemp("int8")
    classes = ("red", "green", "blue")
    make_class_tree(root / "data" / "train", classes=classes, per_class=12)
    make_class_tree(root / "data" / "val", classes=classes, per_class=8, seed=500)
    out = root / "run"
    headstart.train(str(root / "data"), strategy="extract", output=str(out), backbone=TINY, weights="none",
                    epochs=20, lr=0.05, batch_size=8, num_workers=0)  # fmt: skip
    export(out, format="onnx")
    return out


def test_a_normal_calibration_passes_the_gate_and_predicts_like_float(exported):
    from headstart.inference.onnx import load_onnx, read_onnx_metadata

    r = quantize_int8(exported, exported / "model.onnx", calibration_images=32)
    assert r.path == exported / "model.int8.onnx" and r.path.is_file()
    gate = read_onnx_metadata(r.path)["quantization"]["gate"]
    assert json.loads((exported / "model.int8.onnx.json").read_text())["quantization"]["gate"] == gate
    assert gate["passed"] and gate["agreement"] >= 0.99 and gate["drop_points"] <= 0.5
    assert r.attempts[-1].passed and r.int8_bytes < r.float_bytes and r.int8_img_s > 0
    val = sorted(str(p) for p in (exported.parent / "data" / "val").rglob("*.png"))
    f = [p.labels[0] for p in load_onnx(exported / "model.onnx").predict(val, num_workers=0)]
    q = [p.labels[0] for p in load_onnx(r.path).predict(val, num_workers=0)]
    assert np.mean(np.array(f) == np.array(q)) >= 0.99


def test_a_blank_calibration_is_refused_and_leaves_no_file(exported, tmp_path):
    out = tmp_path / "m.int8.onnx"
    out.write_bytes(b"stale")  # an older int8 file must not survive a refusal
    blank = np.zeros((16, 3, 160, 160), np.float32)
    with pytest.raises(QuantizationGateError, match="No int8 model passed the gate") as e:
        quantize_int8(exported, exported / "model.onnx", output=out, calibration=blank, fallbacks=False)
    assert "static int8 (convolutions): top-1 agreement" in str(e.value) and "refused" in str(e.value)
    assert not out.exists() and not list(tmp_path.glob(".int8-*"))


def test_cli_export_quantize(exported):
    r = run_cli("export", exported, "--quantize", "int8", "--calibration-images", "16")
    assert r.returncode == 0, r.stderr
    assert "int8 gate on 24 validation images" in r.stdout and "x smaller" in r.stdout
    meta = json.loads((exported / "model.onnx.json").read_text())
    assert "quantization" not in meta  # the float model's sidecar is the float model's
    r = run_cli("export", exported, "--format", "torchscript", "--quantize", "int8")
    assert r.returncode == 2 and "works with --format onnx" in r.stderr


def test_every_fallback_is_tried_in_order_and_reported(exported, tmp_path):
    import re

    out = tmp_path / "m.int8.onnx"
    with pytest.raises(QuantizationGateError) as e:  # a gate nothing can pass: every recipe runs
        quantize_int8(exported, exported / "model.onnx", output=out, calibration_images=16,
                      min_agreement=1.01)  # fmt: skip
    lines = [x.strip() for x in str(e.value).splitlines() if "nodes in float" in x]
    recipes = [x.split(":")[0] for x in lines]
    assert recipes == [
        "static int8 (convolutions)",
        "static int8, the first 5% of convolutions in float",
        "static int8, the first 10% of convolutions in float",
        "static int8, the first 20% of convolutions in float",
        "static int8, first and last layers in float",
        "static int8, ends and the 10% most drifting nodes in float",
        "static int8, ends and the 20% most drifting nodes in float",
        "dynamic int8 (weights only calibrated)",
    ]
    floats = [int(re.search(r"(\d+) nodes in float", x).group(1)) for x in lines]
    front, ends, drift = floats[1:4], floats[4], floats[5:7]
    assert floats[0] < front[0] <= front[1] <= front[2] and front[0] < front[2]  # convs from the input on
    assert floats[0] + 2 == ends < drift[0] <= drift[1]  # ends: the first and the last convolution
    assert not out.exists()
