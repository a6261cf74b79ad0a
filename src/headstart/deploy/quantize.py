"""int8 ONNX export that refuses to lose accuracy.

Static post-training quantization with ONNX Runtime's tools (QDQ format, per-channel int8 weights
with bias correction, uint8 activations with MinMax ranges) of the convolutions, calibrated on
images of the run's training split; what follows the last convolution (pooling, head, the OOD
distance) stays float. The gate compares the int8 model with the float one on the run's validation
images: it must agree on >= `min_agreement` of top-1 predictions and lose <= `max_drop` accuracy
points. Where it does not, the known fallbacks are tried in order of the weights they keep in
float, each reported: the convolutions nearest the input; the first and last layers; those and the
nodes whose outputs drift most from the float model's (signal-to-quantization-noise ratio, ORT's
qdq_loss_debug); dynamic quantization. If none passes, nothing is written (a stale int8 file of the
run is removed) and the error gives every attempt's numbers. A calibrated run's int8 model gets its
own prediction-set and rejection thresholds, refitted on its outputs with the same targets; how
many sets and unknown/accepted decisions stay the float model's is reported.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from headstart.core.errors import ConfigError, DataError, HeadstartError
from headstart.core.files import MODEL_JSON, read_json, write_json
from headstart.data.images import load_image
from headstart.data.transforms import Preprocess, eval_transform
from headstart.deploy.bias_correction import conv_input_means, write_corrected
from headstart.inference.logits import split_items
from headstart.inference.onnx import (
    INPUT_NAME,
    OOD_OUTPUT,
    OUTPUT_NAMES,
    onnx_session,
    read_onnx_metadata,
    set_onnx_metadata,
)
from headstart.inference.uncertainty import ConformalSets, Rejection, conformal_quantile

CALIBRATION_IMAGES = 128  # measured: 64, 128 and 256 MinMax images give the same ranges on lite0
DRIFT_SHARES = (0.1, 0.2)  # the fallbacks keep these shares of the most drifting nodes in float
# and these shares of the convolutions nearest the input: quantizing the input alone (half a pixel
# level) flips 1.15 % of a fine-tuned CIFAR-10 model's answers, and the noise grows from there
FRONT_SHARES = (0.05, 0.1, 0.2)


# x86 int8 dot-product instructions without the saturation of VPMADDUBSW (16-bit sums), which
# ONNX Runtime's uint8 x int8 kernels use elsewhere: a gate passed on such a CPU can be optimistic
# for an x86 CPU without them (the same lite0 features: cosine to float 0.997 on an AVX512-VNNI box,
# 0.906 on one without, docs/export-and-scale.md)
VNNI = ("avx512_vnni", "avx_vnni", "amx_int8")


def int8_instructions(cpuinfo: str | None = None) -> str:
    """This CPU's int8 dot product as it bears on the gate: a VNNI flag, "x86 without VNNI",
    "arm64", or the machine name with "(instructions unknown)" where /proc/cpuinfo is absent."""
    import platform

    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64"):
        return "arm64"
    try:
        text = cpuinfo if cpuinfo is not None else Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{machine or 'unknown'} (instructions unknown)"
    lines = (line for line in text.splitlines() if line.startswith("flags") and ":" in line)
    flags = next((line.split(":", 1)[1].split() for line in lines), [])
    return next((f for f in VNNI if f in flags), "x86 without VNNI")


class QuantizationGateError(HeadstartError):
    """No int8 model kept the float model's predictions and accuracy; `attempts` holds every
    recipe's numbers."""

    exit_code = 3

    def __init__(self, message: str, attempts: list[Attempt] | None = None):
        super().__init__(message)
        self.attempts = list(attempts or [])


@dataclass
class Attempt:
    """One quantization recipe and what the gate measured."""

    recipe: str
    agreement: float
    float_accuracy: float
    int8_accuracy: float
    excluded_nodes: int
    seconds: float
    passed: bool = False
    bias_corrected: bool = False  # the int8 weights' mean shift folded into the float biases
    # calibrated runs: images whose conformal set, and whose unknown/accepted decision, is the float
    # model's. Reported, not gated: each model's thresholds are fitted on its own outputs, and at a
    # 95 % quantile of 153 images any noise moves an image or two across (measured: 98.69 %)
    set_agreement: float | None = None
    reject_agreement: float | None = None

    def judge(self, min_agreement: float, max_drop: float) -> bool:
        """The gate: top-1 agreement with the float model, and the accuracy it keeps."""
        self.passed = self.agreement >= min_agreement and self.drop_points <= max_drop
        return self.passed

    @property
    def drop_points(self) -> float:
        """Accuracy lost, in percentage points (negative: int8 did better)."""
        return 100 * (self.float_accuracy - self.int8_accuracy)

    def describe(self) -> str:
        """One line."""
        verdict = "passed" if self.passed else "refused"
        extra = "".join(f", {what} {a:.2%}" for what, a in (("same sets", self.set_agreement),
                        ("same unknown/accepted", self.reject_agreement)) if a is not None)  # fmt: skip
        change = 100 * (self.int8_accuracy - self.float_accuracy)
        return (
            f"{self.recipe}: top-1 agreement {self.agreement:.2%}{extra}, accuracy "
            f"{self.float_accuracy:.4f} -> {self.int8_accuracy:.4f} ({change:+.2f} points), "
            f"{self.excluded_nodes} nodes in float, {self.seconds:.0f}s: {verdict}"
        )


@dataclass
class QuantizeResult:
    """Where the int8 model went, the gate's attempts and what it buys on this machine."""

    path: Path
    attempts: list[Attempt]
    validation_images: int
    calibration_images: int
    float_bytes: int
    int8_bytes: int
    float_img_s: float
    int8_img_s: float
    thresholds: dict = field(default_factory=dict)
    cpu: str = field(default_factory=int8_instructions)  # the CPU the gate ran on (VNNI)

    def summary(self) -> dict:
        """The metadata entry stored in the int8 model."""
        return {
            "format": "int8 QDQ (ONNX Runtime static quantization, per-channel weights)"
            + (", bias-corrected" if self.attempts[-1].bias_corrected else ""),
            "recipe": self.attempts[-1].recipe,
            "gate": self.thresholds
            | asdict(self.attempts[-1])
            | {"drop_points": self.attempts[-1].drop_points},
            "attempts": [asdict(a) | {"drop_points": a.drop_points} for a in self.attempts],
            "validation_images": self.validation_images,
            "calibration_images": self.calibration_images,
            "float_bytes": self.float_bytes,
            "int8_bytes": self.int8_bytes,
            "float_img_s": self.float_img_s,
            "int8_img_s": self.int8_img_s,
            "gate_cpu": self.cpu,
        }


def _ort_quantization():
    try:
        from onnxruntime import quantization
    except ImportError as e:
        raise ConfigError("int8 export needs ONNX Runtime: pip install 'headstart[onnx]'.") from e
    return quantization


def load_batch(items: list[tuple[str, int]], preprocess: Preprocess) -> tuple[np.ndarray, np.ndarray]:
    """[0, 1] float32 images at the model's input size, and their labels; unreadable files dropped."""
    t01 = eval_transform(preprocess, normalize=False)
    xs, ys = [], []
    for p, y in items:
        try:
            xs.append(t01(load_image(p, draft=preprocess.resize_size)).numpy())
            ys.append(y)
        except Exception:  # noqa: BLE001, S112 - the gate measures on the readable ones; counts are reported
            continue
    if not xs:
        raise DataError("None of the images for the int8 calibration or gate could be read.")
    return np.stack(xs).astype(np.float32), np.asarray(ys)


def run_model(path: str | os.PathLike, x: np.ndarray, batch: int = 32) -> np.ndarray:
    """Probabilities of an ONNX model for [0, 1] images, in batches."""
    return run_outputs(path, x, batch)[0]


Outputs = tuple[np.ndarray, "np.ndarray | None"]  # probabilities, and OOD scores where the model has them


def run_outputs(path: str | os.PathLike, x: np.ndarray, batch: int = 32) -> Outputs:
    """Probabilities and, where the model has them, OOD scores for [0, 1] images, in batches."""
    session = onnx_session(path)
    names = [OUTPUT_NAMES[0], *[o.name for o in session.get_outputs() if o.name == OOD_OUTPUT]]
    out = [session.run(names, {INPUT_NAME: x[i : i + batch]}) for i in range(0, len(x), batch)]
    probs = np.concatenate([o[0] for o in out])
    return probs, (np.concatenate([o[1] for o in out]) if len(names) > 1 else None)


def compare(float_out: Outputs, int8_out: Outputs, y: np.ndarray, meta: dict) -> tuple[dict, dict]:
    """What the gate measures, and the int8 model's own set and rejection thresholds.

    The thresholds are refitted on the int8 model's outputs for the same validation images, with
    the float model's targets (coverage, acceptance), so they hold for the int8 model; the
    agreements compare its sets and unknown/accepted decisions with the float model's.
    """
    (p_f, ood_f), (p_q, ood_q) = float_out, int8_out
    numbers = {
        "agreement": float((p_q.argmax(1) == p_f.argmax(1)).mean()),
        "float_accuracy": float((p_f.argmax(1) == y).mean()),
        "int8_accuracy": float((p_q.argmax(1) == y).mean()),
    }
    refit: dict = {}
    if meta.get("conformal"):
        f_sets = ConformalSets.from_dict(meta["conformal"])
        q_sets = ConformalSets.fit(p_q, y, coverage=f_sets.coverage, method=f_sets.method)
        numbers["set_agreement"] = float((f_sets.mask(p_f) == q_sets.mask(p_q)).all(axis=1).mean())
        refit["conformal"] = q_sets.to_dict()
    if meta.get("ood") and ood_f is not None and ood_q is not None:
        f_rej = Rejection.from_dict(meta["ood"])
        q_rej = dataclasses.replace(f_rej, threshold=conformal_quantile(ood_q, f_rej.accept),
                                    calibration_images=len(ood_q))  # fmt: skip
        numbers["reject_agreement"] = float((f_rej.unknown(ood_f) == q_rej.unknown(ood_q)).mean())
        refit["ood"] = q_rej.to_dict()
    return numbers, refit


def images_per_second(path: str | os.PathLike, x: np.ndarray, seconds: float = 2.0) -> float:
    """Model-only throughput on a batch of up to 32 images (one warm-up run first)."""
    session = onnx_session(path)
    feed = {INPUT_NAME: x[:32]}
    session.run(None, feed)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        session.run(None, feed)
        n += len(feed[INPUT_NAME])
    return n / (time.perf_counter() - t0)


def quantize_int8(
    run_dir: str | os.PathLike,
    float_path: str | os.PathLike,
    *,
    output: str | os.PathLike | None = None,
    calibration_images: int = CALIBRATION_IMAGES,
    calibration: np.ndarray | None = None,
    min_agreement: float = 0.99,
    max_drop: float = 0.5,
    max_val_images: int = 2000,
    fallbacks: bool = True,
    bias_correction: bool = True,
) -> QuantizeResult:
    """Quantize RUN's float ONNX model to int8 behind the accuracy gate; RUN/model.int8.onnx by default.

    `calibration` replaces the training images with your own [N, 3, H, W] batch in [0, 1];
    `bias_correction` folds the int8 weights' mean shift into the float biases (static recipes).
    """
    q = _ort_quantization()
    run_dir, float_path = Path(run_dir), Path(float_path)
    output = Path(output) if output else run_dir / "model.int8.onnx"
    preprocess = Preprocess.from_dict(read_json(run_dir / MODEL_JSON)["preprocessing"])
    if calibration is None:
        calibration, _ = load_batch(split_items(run_dir, "train", calibration_images), preprocess)
    want = (3, preprocess.input_size, preprocess.input_size)
    if calibration.ndim != 4 or tuple(calibration.shape[1:]) != want:
        raise ConfigError(f"calibration images must be [N, {', '.join(map(str, want))}] in [0, 1]; got "
                          f"{list(calibration.shape)}.")  # fmt: skip
    output.parent.mkdir(parents=True, exist_ok=True)
    x_val, y_val = load_batch(split_items(run_dir, "val", max_val_images), preprocess)
    float_out, meta = run_outputs(float_path, x_val), read_onnx_metadata(float_path)
    thresholds = {"min_agreement": min_agreement, "max_drop_points": max_drop}
    attempts: list[Attempt] = []
    for stale in (output, _sidecar(output)):  # an int8 file of older weights must not outlive a refusal
        stale.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".int8-") as tmp:
        graph = _Graph.prepare(q, float_path, calibration, Path(tmp), bias_correction=bias_correction)
        for recipe in _recipes(fallbacks):
            t0 = time.perf_counter()
            cand = Path(tmp) / f"{len(attempts)}.onnx"
            excluded = recipe.build(graph, cand)
            if not recipe.dynamic:
                _half_tail_matrices(cand, set(graph.tail))
            numbers, refit = compare(float_out, run_outputs(cand, x_val), y_val, meta)
            a = Attempt(recipe.name, **numbers, excluded_nodes=excluded, seconds=time.perf_counter() - t0,
                        bias_corrected=bias_correction and not recipe.dynamic)  # fmt: skip
            attempts.append(a)
            if a.judge(min_agreement, max_drop):
                sizes = float_path.stat().st_size, cand.stat().st_size
                result = QuantizeResult(output, attempts, len(x_val), len(calibration), *sizes, 0.0, 0.0,
                                        thresholds)  # fmt: skip
                return _keep(cand, float_path, result, x_val, meta | refit)
    lines = "\n  ".join(a.describe() for a in attempts)
    raise QuantizationGateError(
        f"No int8 model passed the gate (top-1 agreement >= {min_agreement:.0%} and accuracy loss <= "
        f"{max_drop} points on {len(y_val)} validation images):\n  {lines}\nNo int8 file was written; "
        "deploy the float model (model.onnx), or loosen --min-agreement / --max-drop if these numbers "
        "are acceptable for your use.",
        attempts,
    )


def _keep(
    cand: Path, float_path: Path, result: QuantizeResult, x_val: np.ndarray, meta: dict
) -> QuantizeResult:
    """Measure, stamp the metadata (the int8 model's own set and rejection thresholds included) and
    move the passing model into place."""
    result.float_img_s = images_per_second(float_path, x_val)
    result.int8_img_s = images_per_second(cand, x_val)
    meta = meta | {"quantization": result.summary()}
    set_onnx_metadata(cand, meta)
    shutil.move(str(cand), result.path)
    write_json(_sidecar(result.path), meta)
    result.int8_bytes = result.path.stat().st_size
    return result


def _sidecar(output: Path) -> Path:
    """The JSON beside the int8 model that holds its metadata (model.int8.onnx.json)."""
    return output.with_name(output.name + ".json")


@dataclass
class _Recipe:
    name: str
    keep_float: str = "none"  # none | ends | front | drift
    dynamic: bool = False
    share: float = 0.0  # of the nodes (drift) or of the convolutions (front) kept in float

    def build(self, graph: _Graph, out: Path) -> int:
        """Write the quantized model; returns how many nodes stay in float."""
        q = graph.q
        if self.dynamic:
            q.quantize_dynamic(str(graph.pre), str(out), weight_type=q.QuantType.QInt8, per_channel=True)
            return 0
        exclude = graph.ends if self.keep_float in ("ends", "drift") else graph.tail
        if self.keep_float == "drift":
            exclude = exclude + graph.drifting(self.share, already=set(exclude))
        elif self.keep_float == "front":  # the last convolution, the largest weights, stays int8
            exclude = graph.front(self.share) + exclude
        _static(q, graph.float_source(out, exclude), out, graph.calibration, exclude)
        return len(exclude)


def _recipes(fallbacks: bool) -> list[_Recipe]:
    first = _Recipe("static int8 (convolutions)")
    if not fallbacks:
        return [first]
    front = [_Recipe(f"static int8, the first {s:.0%} of convolutions in float", "front", share=s)
             for s in sorted(FRONT_SHARES)]  # fmt: skip
    drift = [_Recipe(f"static int8, ends and the {s:.0%} most drifting nodes in float", "drift", share=s)
             for s in sorted(DRIFT_SHARES)]  # fmt: skip
    # by the weights kept in float, so the smallest file that passes is the one kept: the
    # convolutions nearest the input are the smallest, the last one (in 'ends') is the largest
    return [
        first,
        *front,
        _Recipe("static int8, first and last layers in float", keep_float="ends"),
        *drift,
        _Recipe("dynamic int8 (weights only calibrated)", dynamic=True),
    ]


def _half_tail_matrices(path: Path, tail: set[str], min_bytes: int = 1 << 20) -> None:
    """Store the large float matrices read only after the last convolution (the OOD distance's
    whitening: 6.6 MB of a 13.7 MB lite0) as float16, cast back to float32 in the graph: half the
    bytes, without int8 noise in the distance (its threshold is refitted on these scores anyway)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    readers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.name)
    for t in list(model.graph.initializer):
        users = readers.get(t.name, [])
        if t.data_type != TensorProto.FLOAT or not users or not set(users) <= tail:
            continue
        a = numpy_helper.to_array(t)
        if a.nbytes < min_bytes:
            continue
        model.graph.initializer.remove(t)
        model.graph.initializer.append(numpy_helper.from_array(a.astype(np.float16), f"{t.name}.fp16"))
        back = helper.make_node("Cast", [f"{t.name}.fp16"], [t.name], name=f"{t.name}.cast",
                                to=TensorProto.FLOAT)  # fmt: skip
        model.graph.node.insert(0, back)
    onnx.save(model, str(path))


def _reader(q, calibration: np.ndarray, batch: int = 16):
    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self.it = iter(
                [{INPUT_NAME: calibration[i : i + batch]} for i in range(0, len(calibration), batch)]
            )

        def get_next(self):
            return next(self.it, None)

    return Reader()


def _static(q, pre: Path, out: Path, calibration: np.ndarray, exclude: list[str]) -> None:
    q.quantize_static(
        str(pre), str(out), _reader(q, calibration), quant_format=q.QuantFormat.QDQ, per_channel=True,
        activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
        calibrate_method=q.CalibrationMethod.MinMax, nodes_to_exclude=exclude,
    )  # fmt: skip


class _Graph:
    """The preprocessed float model, read once: which nodes each recipe keeps in float derives
    from it, and the drift of every node is measured once for all the drift recipes."""

    def __init__(self, q, pre: Path, calibration: np.ndarray, tmp: Path, *, bias_correction: bool = False):
        import onnx

        self.q, self.pre, self.calibration, self.tmp = q, pre, calibration, tmp
        self.bias_correction = bias_correction
        self._means: dict[str, np.ndarray] | None = None
        self.nodes = list(onnx.load(str(pre), load_external_data=False).graph.node)
        convs = [i for i, n in enumerate(self.nodes) if n.op_type == "Conv"]
        # after the last convolution: pooling, head, softmax and the OOD distance. Cheap next to
        # the convolutions, and the distance's large matmul must stay exact
        self.tail = [n.name for n in self.nodes[convs[-1] + 1 :]] if convs else [n.name for n in self.nodes]
        self.convs = [self.nodes[i].name for i in convs]
        # the first convolution, the last one and the tail after it
        self.ends = ([self.convs[0], self.convs[-1]] if convs else []) + self.tail
        self._ranking: list[str] | None = None

    @classmethod
    def prepare(
        cls, q, float_path: Path, calibration: np.ndarray, tmp: Path, *, bias_correction: bool
    ) -> _Graph:
        """ONNX Runtime's pre-processing of the float model (shape inference, fusions) into `tmp`,
        read as a graph; what every recipe, and the benchmarks that compare them, start from."""
        pre = tmp / "pre.onnx"
        q.quant_pre_process(str(float_path), str(pre), skip_symbolic_shape=True)
        return cls(q, pre, calibration, tmp, bias_correction=bias_correction)

    def float_source(self, out: Path, exclude: list[str]) -> Path:
        """The float model a static recipe quantizes: with bias correction, a copy whose quantized
        convolutions' biases absorb their int8 weights' mean shift (those kept float are untouched)."""
        if not self.bias_correction:
            return self.pre
        if self._means is None:  # of the float model's convolution inputs; the same for every recipe
            self._means = conv_input_means(self.pre, self.calibration)
        src = out.with_name(out.stem + ".corrected.onnx")
        write_corrected(self.pre, src, self._means, skip=set(exclude))
        return src

    def front(self, share: float) -> list[str]:
        """The first `share` of the convolutions (rounded up), from the input on."""
        return self.convs[: math.ceil(share * len(self.convs))]

    def drifting(self, share: float, *, already: set[str]) -> list[str]:
        """The quantized nodes (`share` of them, beyond `already`) whose int8 outputs are furthest
        from float: lowest signal-to-quantization-noise ratio on calibration images."""
        left = len(self.nodes) - len({n.name for n in self.nodes} & already)
        return [n for n in self.ranking() if n not in already][: max(1, int(share * left))]

    def ranking(self) -> list[str]:
        """Every node whose output ORT's qdq_loss_debug can compare, most drifting first."""
        if self._ranking is None:
            from onnxruntime.quantization import qdq_loss_debug as dbg

            q, tmp, plain = self.q, self.tmp, self.tmp / "drift-q.onnx"
            _static(q, self.pre, plain, self.calibration, self.tail)
            sample = self.calibration[:32]
            for src, aug in ((self.pre, tmp / "drift-f-aug.onnx"), (plain, tmp / "drift-q-aug.onnx")):
                dbg.modify_model_output_intermediate_tensors(str(src), str(aug))
            acts_f = dbg.collect_activations(str(tmp / "drift-f-aug.onnx"), _reader(q, sample))
            acts_q = dbg.collect_activations(str(tmp / "drift-q-aug.onnx"), _reader(q, sample))
            errors = dbg.compute_activation_error(dbg.create_activation_matching(acts_q, acts_f))
            producer = {o: n.name for n in self.nodes for o in n.output}
            scored = sorted((v["qdq_err"], k) for k, v in errors.items() if "qdq_err" in v and k in producer)
            self._ranking = [producer[k] for _, k in scored]
        return self._ranking
