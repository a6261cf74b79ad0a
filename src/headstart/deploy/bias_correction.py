"""Bias correction for int8 weights (Nagel et al., "Data-Free Quantization", ICCV 2019).

Rounding a convolution's weights to int8 moves the mean of each output channel by (Wq - W) . E[x]:
the same error on every image, which adds up through the network where random rounding noise
would average out. Folding its negative into the float bias, with E[x] measured per input channel
on the calibration images, removes it before ONNX Runtime quantizes the model. Activations are
not corrected: their rounding is unbiased within the calibrated range.

Measured on four fine-tuned CIFAR-10 models (2,000 validation images each): top-1 agreement
with the float model rose in 15 of 16 recipes, by 0.68 points on average (e.g. the first 5 % of
the convolutions in float: 98.60 -> 99.00 %, 97.70 -> 98.60 %, 98.45 -> 99.20 %, and 98.35 ->
99.15 % for `auto`'s model trained on all of CIFAR-10).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

INT8_MAX = 127  # ORT's symmetric int8 weights use [-127, 127] with scale = max|w| / 127


def int8_rounding_error(w: np.ndarray) -> np.ndarray:
    """Wq - W for symmetric per-output-channel int8 weights (ONNX Runtime's per-channel QInt8)."""
    w = np.asarray(w, dtype=np.float64)
    scale = np.abs(w).reshape(len(w), -1).max(axis=1) / INT8_MAX
    scale = np.where(scale > 0, scale, 1.0).reshape(-1, *([1] * (w.ndim - 1)))
    return np.clip(np.round(w / scale), -INT8_MAX, INT8_MAX) * scale - w


def mean_shift(w: np.ndarray, input_means: np.ndarray, group: int = 1) -> np.ndarray:
    """Per-output-channel mean change that int8 weights cause in a (grouped) convolution whose
    input channels average `input_means` (border padding ignored)."""
    err = int8_rounding_error(w).reshape(w.shape[0], w.shape[1], -1).sum(axis=2)  # [out, in/group]
    per_group = w.shape[0] // group
    x = np.asarray(input_means, dtype=np.float64).reshape(group, w.shape[1])
    return np.einsum("gor,gr->go", err.reshape(group, per_group, w.shape[1]), x).reshape(-1)


def conv_input_means(model_path: Path, calibration: np.ndarray, batch: int = 8) -> dict[str, np.ndarray]:
    """Per-channel means of every convolution's input over the calibration images (float model)."""
    import onnx

    from headstart.inference.onnx import INPUT_NAME, onnx_session

    model = onnx.load(str(model_path))
    graph_inputs = {i.name for i in model.graph.input}
    names = list(dict.fromkeys(n.input[0] for n in model.graph.node if n.op_type == "Conv"))
    outputs = {o.name for o in model.graph.output}
    for name in names:
        if name not in outputs and name not in graph_inputs:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    fetch = [n for n in names if n not in graph_inputs]
    session = onnx_session(model.SerializeToString())
    sums = {n: 0.0 for n in names}
    for i in range(0, len(calibration), batch):
        x = calibration[i : i + batch]
        got = session.run(fetch, {INPUT_NAME: x}) if fetch else []  # run([]) would fetch every output
        values = dict(zip(fetch, got, strict=True)) | dict.fromkeys(graph_inputs, x)
        for n in names:
            v = values[n].astype(np.float64)
            sums[n] = sums[n] + v.reshape(v.shape[0], v.shape[1], -1).mean(axis=2).sum(axis=0)
    return {n: s / len(calibration) for n, s in sums.items()}


def write_corrected(src: Path, dst: Path, means: dict[str, np.ndarray], *, skip: set[str]) -> int:
    """Copy the float ONNX model `src` to `dst` with each convolution's bias corrected for its int8
    weights, except the nodes in `skip` (they stay float); returns how many were corrected."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    inits = {t.name: t for t in model.graph.initializer}
    done = 0
    for node in model.graph.node:
        if node.op_type != "Conv" or node.name in skip or node.input[1] not in inits:
            continue
        if node.input[0] not in means:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        shift = mean_shift(w, means[node.input[0]], group)
        if len(node.input) > 2 and node.input[2]:
            bias_name = node.input[2]
            bias = numpy_helper.to_array(inits[bias_name]).astype(np.float64)
            model.graph.initializer.remove(inits[bias_name])
        else:  # a convolution without a bias gets one
            bias_name, bias = f"{node.name}.corrected_bias", np.zeros(w.shape[0])
            node.input.extend([""] * (3 - len(node.input)))
            node.input[2] = bias_name
        corrected = numpy_helper.from_array((bias - shift).astype(np.float32), bias_name)
        model.graph.initializer.append(corrected)
        inits[bias_name] = corrected
        done += 1
    onnx.save(model, str(dst))
    return done
