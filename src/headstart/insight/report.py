"""`headstart report RUN`: one self-contained HTML page of what the model learned, plus PNGs.

Sections: run facts, training curves, confusion matrix (counts and row-normalised), per-class
metrics, calibration (ECE before/after temperature scaling, reliability diagram), a top-losses
gallery and likely label errors (also written to suspect_labels.csv). One pass of logits feeds
every number; evaluation.json is rewritten from it, so the page and the JSON agree. The page is
a Jinja2 template (templates/report.html.j2) rendered with autoescape on.
"""

from __future__ import annotations

import base64
import csv
import io
import os
from collections import Counter
from pathlib import Path

import numpy as np
from markupsafe import Markup

from headstart.core import logs
from headstart.core.files import (
    CONFIG,
    METRICS,
    MODEL_JSON,
    RESULTS,
    SPLIT,
    atomic_write_bytes,
    csv_cell,
    read_json,
    require_finished,
)
from headstart.core.metrics import calibration_summary, fit_temperature
from headstart.data.images import load_image
from headstart.inference.logits import Logits, run_logits
from headstart.inference.predictor import Predictor
from headstart.insight.evaluate import evaluation_of, write_evaluation
from headstart.insight.figures import (
    plot_confusions,
    plot_curves,
    plot_ood_scores,
    plot_per_class,
    plot_reliability,
)
from headstart.training.record import RunResults

SUSPECT_COLUMNS = ["path", "given_label", "predicted_label", "confidence", "given_label_probability", "loss"]
FIGURES = (
    "training_curves.png",
    "confusion_matrices.png",
    "per_class.png",
    "reliability.png",
    "ood_scores.png",
)


def build_report(
    run_dir: str | os.PathLike,
    *,
    data: str | None = None,
    top_losses: int = 12,
    suspect_threshold: float = 0.8,
    device: str = "auto",
    batch_size: int = 64,
    num_workers: int | None = None,
) -> Path:
    """Write RUN/report.html, its PNGs, suspect_labels.csv and evaluation.json; returns the HTML path."""
    run_dir = Path(run_dir)
    require_finished(run_dir)
    model = read_json(run_dir / MODEL_JSON)
    results = RunResults.read(run_dir) if (run_dir / RESULTS).exists() else RunResults()
    predictor, lg = run_logits(
        run_dir, data=data, device=device, batch_size=batch_size, num_workers=num_workers,
        features=bool(model.get("ood")),
    )  # fmt: skip
    temperature = predictor.temperature
    ev = evaluation_of(lg, temperature, run_dir)
    write_evaluation(run_dir, ev)

    # Calibration: the stored temperature if `calibrate` ran, else what fitting one would give.
    cal = None
    if len(lg.y):
        stored = results.calibration
        t_fit = float(stored["temperature"]) if stored else fit_temperature(lg.logits, lg.y, lg.head_kind)
        cal = calibration_summary(lg.logits, lg.y, lg.head_kind, t_fit)
    rows = per_image(lg, lg.probs(temperature))
    suspects = sorted(
        (r for r in rows if r["wrong"] and r["confidence"] >= suspect_threshold),
        key=lambda r: -r["confidence"],
    )
    write_suspects(suspects, run_dir / "suspect_labels.csv")
    worst = sorted(rows, key=lambda r: -r["loss"])[: max(0, top_losses)]
    unknown = uncertainty_section(predictor, lg, results.calibration or {})
    figs = write_figures(run_dir, read_metrics(run_dir / METRICS), ev, cal, unknown)
    for r in worst:
        r["thumb"] = _thumb(r["path"], 220)
    for r in suspects[:30]:
        r["thumb"] = _thumb(r["path"], 64)
    split = read_json(run_dir / SPLIT) if (run_dir / SPLIT).exists() else {}
    config = read_json(run_dir / CONFIG) if (run_dir / CONFIG).exists() else {}
    page = render(
        run_dir=str(run_dir),
        backbone=model["backbone"]["name"],
        strategy=model.get("strategy", results.strategy or "?"),
        ev=ev,
        cal=cal,
        unknown=unknown,
        temperature=temperature,
        cal_applied=bool(results.calibration and cal) and abs(temperature - cal["temperature"]) < 1e-9,
        facts=facts(results, config, ev, model, split, temperature),
        figs=figs,
        best_epoch=results.best_epoch,
        classes=ev["confusion_matrix"]["classes"],
        cm=ev["confusion_matrix"]["rows_true_cols_pred"],
        worst=worst,
        suspects=suspects,
        suspect_threshold=suspect_threshold,
    )
    out = run_dir / "report.html"
    atomic_write_bytes(out, page.encode("utf-8"))
    return out


def uncertainty_section(predictor: Predictor, lg: Logits, stored: dict) -> dict:
    """Sets (coverage vs target, sizes) and rejection (scores, acceptance) on the report's images."""
    out: dict = {"sets": None, "ood": None}
    if predictor.sets and len(lg.y):
        m = predictor.sets.mask(lg.probs(predictor.temperature))
        sizes = m.sum(1)
        out["sets"] = predictor.sets.to_dict() | {
            "coverage": float(m[np.arange(len(lg.y)), lg.y].mean()),
            "target": predictor.sets.coverage,
            "size_mean": float(sizes.mean()),
            "size_counts": sorted(Counter(sizes.tolist()).items()),
            "held_out": stored.get("sets", {}).get("held_out"),
        }
    if predictor.distance is not None and lg.features is not None and len(lg.y):
        scores = predictor.distance.score(lg.features)
        out["ood"] = predictor.rejection.to_dict() | {
            "scores": scores,
            "accepted": float((scores <= predictor.rejection.threshold).mean()),
            "held_out": stored.get("ood", {}).get("held_out"),
        }
    out["same_images"] = lg.data == stored.get("data")  # in-sample: the fit's own images
    return out


def write_figures(
    run_dir: Path, metrics: list[dict], ev: dict, cal: dict | None, unknown: dict | None = None
) -> dict[str, str]:
    """The report's PNGs beside it; returns them base64-encoded by section."""
    paths = {}
    if metrics:
        plot_curves(metrics, run_dir / FIGURES[0])
        paths["curves"] = run_dir / FIGURES[0]
    cm = np.asarray(ev["confusion_matrix"]["rows_true_cols_pred"])
    plot_confusions(cm, ev["confusion_matrix"]["classes"], run_dir / FIGURES[1])
    paths["confusion"] = run_dir / FIGURES[1]
    plot_per_class(ev["per_class"], run_dir / FIGURES[2])
    paths["per_class"] = run_dir / FIGURES[2]
    if cal:
        plot_reliability(cal, run_dir / FIGURES[3])
        paths["reliability"] = run_dir / FIGURES[3]
    if unknown and unknown["ood"]:
        plot_ood_scores(unknown["ood"]["scores"], unknown["ood"]["threshold"], run_dir / FIGURES[4])
        paths["ood"] = run_dir / FIGURES[4]
    return {k: base64.b64encode(p.read_bytes()).decode() for k, p in paths.items()}


def render(**context) -> str:
    """The page from templates/report.html.j2, every value escaped."""
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(
        loader=PackageLoader("headstart.insight", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=StrictUndefined,
        keep_trailing_newline=True,
    )
    env.filters["repr"] = repr
    return env.get_template("report.html.j2").render(**context)


def facts(r: RunResults, cfg: dict, ev: dict, model: dict, split: dict, temperature: float) -> list[tuple]:
    """Run-facts rows (label, value, [(path, reason), ...]); values are escaped by the template."""

    def counts(which: str) -> str:
        items = split.get(which) or []
        classes = split.get("classes") or model["classes"]
        c = np.bincount([int(y) for _, y in items], minlength=len(classes)) if items else []
        return ", ".join(f"{n} {int(v)}" for n, v in zip(classes, c, strict=False)) or "?"

    changed, checked = r.frozen_tensors_changed, r.frozen_tensors_checked
    if changed == 0:
        proof = Markup("<span class='ok'>passed</span>: {} of {} frozen tensors changed").format(
            changed, checked
        )
    elif checked:
        proof = Markup("<span class='wrong'>{} of {} frozen tensors changed</span>").format(changed, checked)
    else:
        proof = "not recorded"
    times = [
        f"{k.replace('_seconds', '').replace('_', ' ')} {v:.1f}s"
        for k, v in (
            ("train_seconds", r.train_seconds),
            ("extract_seconds", r.extract_seconds),
            ("head_train_seconds", r.head_train_seconds),
            ("train_loop_seconds", r.train_loop_seconds),
        )
        if isinstance(v, int | float)
    ]
    skipped = list(r.skipped_files) + [s for s in ev.get("skipped_files", []) if s not in r.skipped_files]
    unfrozen = f" · unfrozen: {', '.join(map(str, r.unfrozen_modules))}" if r.unfrozen_modules else ""
    best = (
        f"{_or(r.best_epoch)} of {_or(r.epochs_run)}; val accuracy at training {r.val_accuracy:.4f}"
        if isinstance(r.val_accuracy, int | float)
        else "?"
    )
    return [
        ("backbone", f"{model['backbone']['name']} (weights: {model['backbone'].get('weights')})", []),
        ("strategy", f"{model.get('strategy', r.strategy or '?')}{unfrozen}", []),
        ("head", str(r.head or model["head"]["kind"]), []),
        ("parameters", f"{_int(r.trainable_params)} trainable / {_int(r.frozen_params)} frozen", []),
        ("frozen proof", proof, []),
        ("training images", f"{_int(r.num_train)} ({counts('train')})", []),
        ("validation images", f"{_int(r.num_val)} ({counts('val')})", []),
        ("best epoch", best, []),
        ("times", ", ".join(times) or "?", []),
        ("device", str(r.device or cfg.get("device", "?")), []),
        ("temperature", f"{temperature:.4f}", []),
        ("versions", ", ".join(f"{n} {v}" for n, v in cfg.get("versions", {}).items()) or "?", []),
        ("skipped files", str(len(skipped)), [(s.get("path"), s.get("reason")) for s in skipped[:20]]),
    ]


def _or(v) -> str:
    return "?" if v is None else str(v)


def _int(v) -> str:
    return f"{v:,}" if isinstance(v, int) else _or(v)


# ----------------------------------------------------------------------------- data


def per_image(lg: Logits, probs: np.ndarray) -> list[dict]:
    """One row per image: path, given and predicted label, confidence, p(given), loss."""
    out = []
    for path, y, p in zip(lg.paths, lg.y, probs, strict=True):
        k = int(p.argmax())
        py = float(p[y])
        out.append(
            {
                "path": path,
                "given_label": lg.classes[y],
                "predicted_label": lg.classes[k],
                "confidence": float(p[k]),
                "given_label_probability": py,
                "loss": float(-np.log(max(py, 1e-12))),
                "wrong": k != int(y),
                "short": _short(path),
            }
        )
    return out


def write_suspects(rows: list[dict], path: Path) -> None:
    """suspect_labels.csv: confidently wrong predictions, most confident first."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(SUSPECT_COLUMNS)
    for r in rows:
        w.writerow(
            [
                csv_cell(r["path"]),
                csv_cell(r["given_label"]),
                csv_cell(r["predicted_label"]),
                f"{r['confidence']:.6f}",
                f"{r['given_label_probability']:.6f}",
                f"{r['loss']:.6f}",
            ]
        )
    atomic_write_bytes(path, buf.getvalue().encode())


def read_metrics(path: Path) -> list[dict]:
    """metrics.csv rows as floats (empty when the run has no per-epoch log); a row whose numbers do not
    read as numbers is left out of the curves, with a warning, rather than failing the report."""
    if not path.exists():
        return []
    needed = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc")
    rows, bad = [], 0
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            values = {k: _float(v) for k, v in row.items() if k is not None}
            if all(isinstance(values.get(k), float) for k in needed):
                rows.append({k: v for k, v in values.items() if v is not None})
            else:
                bad += 1
    if bad:
        logs.warning(f"{path}: {bad} row(s) with values that are not numbers left out of the training curves")
    return rows


def _float(v: str | None) -> float | None:
    try:
        return float(v) if v not in ("", None) else None
    except ValueError:
        return None


def _thumb(path: str, size: int) -> str:
    """A JPEG data URI of the image, or '' when it cannot be read."""
    try:
        im = load_image(path, draft=size * 2)
    except Exception:  # noqa: BLE001 - a thumbnail is optional; the path is still listed
        return ""
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _short(path: str) -> str:
    """class-folder/file name: enough to find the image, short enough for a tile."""
    p = Path(path)
    return f"{p.parent.name}/{p.name}"
