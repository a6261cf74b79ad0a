"""Export: ONNX / TorchScript / safetensors, metadata, and the parity check that guards them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import headstart
from headstart import cli
from headstart.deploy.export import ExportParityError, export
from headstart.inference.onnx import read_onnx_metadata

from conftest import TINY, make_class_tree, run_cli

pytest.importorskip("onnxruntime", reason="ONNX tests need the onnx extra: pip install 'headstart[onnx]'")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A tiny-backbone run that classifies red/green at 100%."""
    root = tmp_path_factory.mktemp("export")
    make_class_tree(root / "data" / "train", per_class=12)
    make_class_tree(root / "data" / "val", per_class=5, seed=500)
    out = root / "run"
    headstart.train(
        str(root / "data"),
        strategy="extract",
        output=str(out),
        backbone=TINY,
        weights="none",
        epochs=20,
        lr=0.05,
        batch_size=8,
        num_workers=0,
    )
    return out


def test_onnx_export_parity_metadata_dynamic_batch(tiny_run, tmp_path):
    import onnxruntime as ort

    out = tmp_path / "m.onnx"
    r = export(tiny_run, format="onnx", output=out)
    assert r.parity.passed and r.parity.images == 10 and r.parity.top1_agreement == 1.0
    assert r.parity.max_abs_diff <= 1e-4 and r.parity.source.startswith("validation files")
    meta = read_onnx_metadata(out)
    assert meta["classes"] == ["green", "red"]
    pp = json.loads((tiny_run / "model.json").read_text())["preprocessing"]
    assert meta["preprocessing"]["input_size"] == 160 == pp["input_size"]
    assert meta["preprocessing"]["resize_size"] == pp["resize_size"]
    assert meta["input"]["range"] == [0.0, 1.0] and "dynamo=True" in meta["exporter"]
    assert json.loads((tmp_path / "m.onnx.json").read_text())["classes"] == ["green", "red"]
    # no exporter stack traces: they would ship this machine's paths (and weigh 0.4 MB on lite0)
    assert str(Path(headstart.__file__).parent).encode() not in out.read_bytes()
    s = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,) = s.get_inputs()
    assert inp.name == "image" and isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 160, 160]
    assert [o.name for o in s.get_outputs()] == ["probabilities", "logits"]
    for b in (1, 3, 7):  # batch sizes other than the example used to export
        probs, logits = s.run(None, {"image": np.random.rand(b, 3, 160, 160).astype(np.float32)})
        assert probs.shape == (b, 2) and logits.shape == (b, 2)
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_torchscript_and_safetensors_exports_pass_parity(tiny_run, tmp_path):
    ts = export(tiny_run, format="torchscript", output=tmp_path / "m.pt")
    assert ts.parity.passed and ts.parity.images == 10
    assert json.loads((tmp_path / "m.pt.json").read_text())["classes"] == ["green", "red"]
    st = export(tiny_run, format="safetensors", output=tmp_path / "st")
    assert st.parity.passed and st.parity.max_abs_diff == 0.0
    assert headstart.load(tmp_path / "st", device="cpu").classes == ["green", "red"]


def test_parity_failure_raises_exits_nonzero_and_moves_file_aside(tiny_run, tmp_path, monkeypatch, capsys):
    import headstart.deploy.export as ex

    real = ex._runner

    def corrupted(fmt, path):
        run = real(fmt, path)
        return lambda x: run(x) + 1e-3  # a 1e-3 error is ten times the fp32 tolerance

    monkeypatch.setattr(ex, "_runner", corrupted)
    with pytest.raises(ExportParityError, match="does not reproduce"):
        export(tiny_run, format="onnx", output=tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists() and (tmp_path / "bad.onnx.rejected").exists()
    assert not (tmp_path / "bad.onnx.json").exists()
    code = cli.main(["export", str(tiny_run), "--format", "torchscript", "--output", str(tmp_path / "b.pt")])
    assert code == 3 and "headstart: error:" in capsys.readouterr().err


def test_parity_uses_generated_images_when_val_files_are_gone(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "moved"
    shutil.copytree(tiny_run, run)
    split = json.loads((run / "split.json").read_text())
    split["val"] = [[f"/nonexistent/{i}.png", y] for i, (_, y) in enumerate(split["val"])]
    (run / "split.json").write_text(json.dumps(split))
    r = export(run, format="onnx")
    assert r.parity.passed and r.parity.source.startswith("generated") and r.parity.images > 0
    assert len(r.parity.skipped) == 10 and (run / "model.onnx").exists()


def test_temperature_is_inside_the_onnx_graph(tiny_run, tmp_path):
    import shutil

    import onnxruntime as ort

    run = tmp_path / "hot"
    shutil.copytree(tiny_run, run)
    record = json.loads((run / "model.json").read_text())
    record["temperature"] = 3.0
    (run / "model.json").write_text(json.dumps(record))
    r = export(run, format="onnx")  # the original applies T=3 too, so parity must still hold
    assert r.parity.passed and read_onnx_metadata(r.path)["temperature"] == 3.0
    s = ort.InferenceSession(str(r.path), providers=["CPUExecutionProvider"])
    probs, logits = s.run(None, {"image": np.random.rand(4, 3, 160, 160).astype(np.float32)})
    e = np.exp(logits / 3.0 - (logits / 3.0).max(1, keepdims=True))
    np.testing.assert_allclose(probs, e / e.sum(1, keepdims=True), atol=1e-6)
    e1 = np.exp(logits - logits.max(1, keepdims=True))
    assert np.abs(probs - e1 / e1.sum(1, keepdims=True)).max() > 1e-3


def test_predict_engine_onnx_matches_torch_cli(tiny_run, tmp_path):
    assert run_cli("export", tiny_run, "--output", tmp_path / "m.onnx").returncode == 0
    val = Path(json.loads((tiny_run / "split.json").read_text())["val"][0][0]).parents[1]
    rows = {}
    for engine, model in (("torch", tiny_run), ("onnx", tmp_path / "m.onnx")):
        out = tmp_path / f"{engine}.csv"
        r = run_cli("predict", model, val, "--engine", engine, "--csv", out, "--workers", "0")
        assert r.returncode == 0, r.stderr
        rows[engine] = list(csv.DictReader(out.open()))
    assert len(rows["onnx"]) == 10
    for a, b in zip(rows["torch"], rows["onnx"], strict=True):
        assert a["path"] == b["path"] and a["label"] == b["label"]
        assert abs(float(a["probability"]) - float(b["probability"])) < 1e-4


def test_predict_engine_onnx_without_export_is_a_clear_error(tiny_run, tmp_path):
    r = run_cli("predict", tmp_path, tiny_run, "--engine", "onnx")
    assert r.returncode == 2 and "headstart export" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_hymenoptera_onnx_export_parity_and_same_top1_as_torch(hymenoptera_run, tmp_path):
    r = export(hymenoptera_run, format="onnx")
    print(r.parity.describe())
    assert r.parity.passed and r.parity.images == 153
    from headstart.inference.onnx import load_onnx

    val = [p for p, _ in json.loads((hymenoptera_run / "split.json").read_text())["val"]]
    torch_preds = headstart.load(hymenoptera_run, device="cpu").predict(val, num_workers=0)
    onnx_preds = load_onnx(hymenoptera_run / "model.onnx").predict(val, num_workers=0)
    assert len(onnx_preds) == 153 and all(p.error is None for p in onnx_preds)
    assert [p.label for p in torch_preds] == [p.label for p in onnx_preds]
    diff = max(abs(a.probability - b.probability) for a, b in zip(torch_preds, onnx_preds, strict=True))
    assert diff < 1e-4
