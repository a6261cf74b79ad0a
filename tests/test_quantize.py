"""int8 export: the gate passes a normal calibration, refuses a broken one and leaves no file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import headstart
from headstart.data.transforms import Preprocess
from headstart.deploy.export import export
from headstart.deploy.quantize import (
    Attempt,
    QuantizationGateError,
    compare,
    int8_instructions,
    load_batch,
    quantize_int8,
    run_outputs,
)
from headstart.inference.logits import split_items
from headstart.inference.uncertainty import ConformalSets, conformal_quantile

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
    headstart.calibrate(out, num_workers=0)  # prediction sets and rejection: the gate checks those too
    export(out, format="onnx")
    return out


def test_a_normal_calibration_passes_the_gate_and_predicts_like_float(exported):
    from headstart.inference.onnx import load_onnx, read_onnx_metadata

    r = quantize_int8(exported, exported / "model.onnx", calibration_images=32)
    assert r.path == exported / "model.int8.onnx" and r.path.is_file()
    gate = read_onnx_metadata(r.path)["quantization"]["gate"]
    assert json.loads((exported / "model.int8.onnx.json").read_text())["quantization"]["gate"] == gate
    assert gate["passed"] and gate["agreement"] >= 0.99 and gate["drop_points"] <= 0.5
    assert gate["bias_corrected"] and "bias-corrected" in read_onnx_metadata(r.path)["quantization"]["format"]
    assert 0 < gate["set_agreement"] <= 1 and 0 < gate["reject_agreement"] <= 1  # reported
    assert read_onnx_metadata(r.path)["quantization"]["gate_cpu"] == int8_instructions()
    # the int8 model carries its own rejection threshold, fitted on its scores of the validation images
    float_meta, int8_meta = read_onnx_metadata(exported / "model.onnx"), read_onnx_metadata(r.path)
    assert int8_meta["ood"]["accept"] == float_meta["ood"]["accept"]
    assert int8_meta["ood"]["calibration_images"] == 24
    preprocess = Preprocess.from_dict(float_meta["preprocessing"])
    scores = run_outputs(r.path, load_batch(split_items(exported, "val", 2000), preprocess)[0])[1]
    accept = float_meta["ood"]["accept"]
    assert int8_meta["ood"]["threshold"] == pytest.approx(conformal_quantile(scores, accept))
    assert int8_meta["conformal"]["coverage"] == float_meta["conformal"]["coverage"]
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


def test_with_fallbacks_a_blank_calibration_keeps_only_a_model_that_really_agrees(exported, tmp_path):
    """All-int8 on blank calibration is refused; a fallback may pass (on this tiny model, keeping
    the first convolutions in float does), and then the file written agrees with the float model on
    the validation images when measured again, outside the gate."""
    out = tmp_path / "m.int8.onnx"
    blank = np.zeros((16, 3, 160, 160), np.float32)
    try:
        attempts = quantize_int8(exported, exported / "model.onnx", output=out, calibration=blank).attempts
    except QuantizationGateError as e:
        attempts = e.attempts
        assert not out.exists()
    assert not attempts[0].passed and all(not a.passed for a in attempts[:-1])
    if attempts[-1].passed:
        from headstart.inference.onnx import load_onnx

        val = sorted(str(p) for p in (exported.parent / "data" / "val").rglob("*.png"))
        f = [p.labels[0] for p in load_onnx(exported / "model.onnx").predict(val, num_workers=0)]
        q = [p.labels[0] for p in load_onnx(out).predict(val, num_workers=0)]
        assert np.mean(np.array(f) == np.array(q)) >= 0.99 and attempts[-1].agreement >= 0.99


def test_cli_export_quantize(exported):
    r = run_cli("export", exported, "--quantize", "int8", "--calibration-images", "16")
    assert r.returncode == 0, r.stderr
    assert "int8 gate on 24 validation images" in r.stdout and "x smaller" in r.stdout
    meta = json.loads((exported / "model.onnx.json").read_text())
    assert "quantization" not in meta  # the float model's sidecar is the float model's
    int8_meta = json.loads((exported / "model.int8.onnx.json").read_text())["quantization"]
    assert int8_meta["format"].endswith("bias-corrected") and int8_meta["gate"]["bias_corrected"]
    r = run_cli("export", exported, "--quantize", "int8", "--calibration-images", "8", "--no-bias-correction")
    assert r.returncode == 0, r.stderr
    int8_meta = json.loads((exported / "model.int8.onnx.json").read_text())["quantization"]
    assert "bias" not in int8_meta["format"] and not int8_meta["gate"]["bias_corrected"]
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
    assert [a.bias_corrected for a in e.value.attempts] == [True] * 7 + [False]  # static ones only
    front, ends, drift = floats[1:4], floats[4], floats[5:7]
    assert floats[0] < front[0] <= front[1] <= front[2] and front[0] < front[2]  # convs from the input on
    assert floats[0] + 2 == ends < drift[0] <= drift[1]  # ends: the first and the last convolution
    assert not out.exists()


def test_sets_and_rejection_are_refitted_on_the_int8_outputs_and_compared():
    rng = np.random.default_rng(0)
    n = 400
    y = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3)) + 2.0 * np.eye(3)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ood = rng.gamma(4.0, 10.0, n)
    f_sets = ConformalSets.fit(p, y, coverage=0.9)
    meta = {"conformal": f_sets.to_dict(), "ood": {"threshold": conformal_quantile(ood, 0.95), "accept": 0.95,
            "calibration_images": n, "train_images": 50, "feature_dim": 8}}  # fmt: skip
    # int8 scores 10 % higher everywhere: the float threshold would now reject about twice as many
    # images, the refitted one keeps every decision
    numbers, refit = compare((p, ood), (p, 1.1 * ood), y, meta)
    assert numbers["reject_agreement"] == 1.0 and numbers["set_agreement"] == 1.0
    assert (1.1 * ood > meta["ood"]["threshold"]).mean() > 0.08
    assert refit["ood"]["threshold"] == pytest.approx(1.1 * conformal_quantile(ood, 0.95))
    assert refit["ood"]["calibration_images"] == n and refit["conformal"]["coverage"] == 0.9
    # int8 noise moves images across the thresholds: reported, while the gate is top-1 and accuracy
    noisy_p = p * np.exp(rng.normal(scale=0.3, size=p.shape))
    noisy_p /= noisy_p.sum(1, keepdims=True)
    numbers, _ = compare((p, ood), (noisy_p, ood * rng.uniform(0.8, 1.2, n)), y, meta)
    assert numbers["set_agreement"] < 0.99 and numbers["reject_agreement"] < 0.99
    a = Attempt("r", **numbers, excluded_nodes=0, seconds=0.0)
    assert a.judge(numbers["agreement"], 100.0) and not a.judge(numbers["agreement"] + 1e-9, 100.0)
    assert f"same sets {numbers['set_agreement']:.2%}" in a.describe()
    plain, refit = compare((p, None), (noisy_p, None), y, {})  # uncalibrated: top-1 and accuracy only
    assert set(plain) == {"agreement", "float_accuracy", "int8_accuracy"} and refit == {}


def test_large_matrices_after_the_last_convolution_are_stored_as_float16(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from headstart.deploy.quantize import _half_tail_matrices
    from headstart.inference.onnx import onnx_session

    rng = np.random.default_rng(0)
    w_tail = rng.normal(size=(600, 600)).astype(np.float32)  # 1.44 MB, read only by the tail
    w_body = rng.normal(size=(600, 600)).astype(np.float32)  # as large, but read before the tail
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w_body"], ["h"], name="body"),
            helper.make_node("MatMul", ["h", "w_tail"], ["y"], name="tail"),
        ],  # fmt: skip
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 600])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 600])],
        [numpy_helper.from_array(w_body, "w_body"), numpy_helper.from_array(w_tail, "w_tail")],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = rng.normal(size=(1, 600)).astype(np.float32)
    before = onnx_session(path).run(None, {"x": x})[0]
    size = path.stat().st_size
    _half_tail_matrices(path, {"tail"})
    kinds = {t.name: t.data_type for t in onnx.load(str(path)).graph.initializer}
    assert kinds == {"w_body": TensorProto.FLOAT, "w_tail.fp16": TensorProto.FLOAT16}
    assert path.stat().st_size < 0.8 * size
    after = onnx_session(path).run(None, {"x": x})[0]
    assert np.abs(after - before).max() <= 1e-3 * np.abs(before).max()


def _conv_model(path: Path, w: np.ndarray, bias: np.ndarray | None, group: int) -> None:
    """image -> Conv (no padding) -> y, as a float ONNX file."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(w.astype(np.float32), "w")]
    inputs = ["image", "w"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias.astype(np.float32), "b"))
        inputs.append("b")
    graph = helper.make_graph(
        [helper.make_node("Conv", inputs, ["y"], name="conv", group=group)],
        "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, w.shape[1] * group, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.mark.parametrize(("group", "with_bias"), [(1, True), (8, False), (2, True)])
def test_bias_correction_cancels_the_mean_shift_of_int8_weights(tmp_path, group, with_bias):
    import onnx
    from onnx import numpy_helper

    from headstart.deploy.bias_correction import conv_input_means, int8_rounding_error, write_corrected
    from headstart.inference.onnx import onnx_session

    rng = np.random.default_rng(1)
    out_ch, in_ch = 8, 8
    w = rng.normal(size=(out_ch, in_ch // group, 3, 3))
    w[0] *= 1e-3  # a channel of small weights: its own scale, its own error
    bias = rng.normal(size=out_ch) if with_bias else None
    # images constant per channel, far from zero mean: the mean shift is then exactly (Wq - W) . E[x]
    x = np.broadcast_to(rng.uniform(1, 5, size=(32, in_ch, 1, 1)), (32, in_ch, 6, 6)).astype(np.float32)
    src, fixed = tmp_path / "f.onnx", tmp_path / "c.onnx"
    _conv_model(src, w, bias, group)
    means = conv_input_means(src, x)
    assert means["image"] == pytest.approx(x.mean(axis=(0, 2, 3)), rel=1e-6)
    assert write_corrected(src, fixed, means, skip=set()) == 1
    b_fixed = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(fixed)).graph.initializer}
    b_fixed = b_fixed["b" if with_bias else "conv.corrected_bias"]
    # the float model, and its int8-rounded weights with the corrected bias
    y_float = onnx_session(src).run(None, {"image": x})[0].mean(axis=(0, 2, 3))
    _conv_model(tmp_path / "q.onnx", w + int8_rounding_error(w), b_fixed, group)
    y_int8w = onnx_session(tmp_path / "q.onnx").run(None, {"image": x})[0].mean(axis=(0, 2, 3))
    _conv_model(tmp_path / "u.onnx", w + int8_rounding_error(w), bias, group)
    y_uncorrected = onnx_session(tmp_path / "u.onnx").run(None, {"image": x})[0].mean(axis=(0, 2, 3))
    assert np.abs(y_uncorrected - y_float).max() > 1e-3  # rounding moves the means ...
    assert np.abs(y_int8w - y_float).max() < 2e-5  # ... and the corrected bias moves them back
    assert write_corrected(src, tmp_path / "s.onnx", means, skip={"conv"}) == 0  # kept float: untouched


def test_the_rounding_corrected_for_is_onnx_runtimes(tmp_path):
    import onnx
    from onnx import numpy_helper
    from onnxruntime import quantization as q

    from headstart.deploy.bias_correction import int8_rounding_error
    from headstart.deploy.quantize import _static

    rng = np.random.default_rng(2)
    w = rng.normal(size=(16, 8, 3, 3)) * rng.uniform(0.01, 2, size=(16, 1, 1, 1))
    src, out = tmp_path / "f.onnx", tmp_path / "q.onnx"
    _conv_model(src, w, rng.normal(size=16), 1)
    _static(q, src, out, rng.uniform(0, 1, size=(8, 8, 6, 6)).astype(np.float32), [])
    model = onnx.load(str(out))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0].startswith("w"))
    ort_w = inits[dq.input[0]].astype(np.float64) * inits[dq.input[1]].reshape(-1, 1, 1, 1)
    assert inits[dq.input[0]].dtype == np.int8
    assert np.abs(ort_w - (w + int8_rounding_error(w))).max() < 1e-6 * np.abs(w).max()


def test_the_gate_records_whether_its_cpu_has_vnni(monkeypatch):
    """x86 without VNNI can saturate where a VNNI CPU does not: the metadata says which ran the gate."""
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert int8_instructions("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n") == "avx512_vnni"
    assert int8_instructions("flags\t\t: fpu avx2 avx_vnni\n") == "avx_vnni"
    assert int8_instructions("flags\t\t: fpu sse4_2 avx2 avx512f avx512bw\n") == "x86 without VNNI"
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    assert int8_instructions("") == "arm64"
