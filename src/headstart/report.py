"""`headstart report RUN`: one self-contained HTML page of what the model learned, plus PNGs.

Sections: run facts, training curves, confusion matrix (counts and row-normalised), per-class
metrics, calibration (ECE before/after temperature scaling, reliability diagram), a top-losses
gallery and likely label errors (also written to suspect_labels.csv). The headline numbers come
from evaluation.json, which this refreshes through `evaluate()`, so the page and the JSON agree.
"""

# HTML template lines read better unbroken.
# ruff: noqa: E501
from __future__ import annotations

import base64
import csv
import html
import io
import os
from pathlib import Path

import numpy as np

from headstart.calibrate import Logits, calibration_summary, collect_logits, fit_temperature
from headstart.runs import CONFIG, METRICS, MODEL_JSON, RESULTS, SPLIT, read_json

SUSPECT_COLUMNS = ["path", "given_label", "predicted_label", "confidence", "given_label_probability", "loss"]
FIGURES = ("training_curves.png", "confusion_matrices.png", "per_class.png", "reliability.png")


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
    """Write RUN/report.html, its PNG figures and suspect_labels.csv; returns the HTML path."""
    from headstart.evaluate import evaluate

    run_dir = Path(run_dir)
    model = read_json(run_dir / MODEL_JSON)
    results = read_json(run_dir / RESULTS) if (run_dir / RESULTS).exists() else {}
    config = read_json(run_dir / CONFIG) if (run_dir / CONFIG).exists() else {}
    ev = evaluate(run_dir, data=data, device=device, batch_size=batch_size, num_workers=num_workers)
    lg = collect_logits(run_dir, data=data, device=device, batch_size=batch_size, num_workers=num_workers)
    classes = list(model["classes"])
    temperature = float(model.get("temperature", 1.0))

    # Calibration: the stored temperature if `calibrate` ran, else what fitting one would give.
    cal_stored = results.get("calibration")
    cal = None
    if len(lg.y):
        t_fit = (
            float(cal_stored["temperature"]) if cal_stored else fit_temperature(lg.logits, lg.y, lg.head_kind)
        )
        cal = calibration_summary(lg, t_fit)

    probs = lg.probs(temperature)
    rows = per_image(lg, probs)
    suspects = [r for r in rows if r["wrong"] and r["confidence"] >= suspect_threshold]
    suspects.sort(key=lambda r: -r["confidence"])
    write_suspects(suspects, run_dir / "suspect_labels.csv")
    worst = sorted(rows, key=lambda r: -r["loss"])[: max(0, top_losses)]

    metrics = read_metrics(run_dir / METRICS)
    figs = {}
    if metrics:
        plot_curves(metrics, run_dir / "training_curves.png")
        figs["curves"] = run_dir / "training_curves.png"
    cm = np.asarray(ev["confusion_matrix"]["rows_true_cols_pred"])
    plot_confusions(cm, classes, run_dir / "confusion_matrices.png")
    figs["confusion"] = run_dir / "confusion_matrices.png"
    plot_per_class(ev["per_class"], run_dir / "per_class.png")
    figs["per_class"] = run_dir / "per_class.png"
    if cal:
        plot_reliability(cal, run_dir / "reliability.png")
        figs["reliability"] = run_dir / "reliability.png"

    page = render_html(
        run_dir=run_dir, model=model, results=results, config=config, ev=ev, cal=cal,
        cal_applied=bool(cal_stored and cal) and abs(temperature - cal["temperature"]) < 1e-9, temperature=temperature,
        worst=worst, suspects=suspects, suspect_threshold=suspect_threshold, figs=figs,
        metrics=metrics, data=data, split=read_json(run_dir / SPLIT) if (run_dir / SPLIT).exists() else None,
    )  # fmt: skip
    out = run_dir / "report.html"
    from headstart.runs import atomic_write_bytes

    atomic_write_bytes(out, page.encode("utf-8"))
    return out


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
            }
        )
    return out


def write_suspects(rows: list[dict], path: Path) -> None:
    """suspect_labels.csv: confidently wrong predictions, most confident first."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(SUSPECT_COLUMNS)
    for r in rows:
        w.writerow([r["path"], r["given_label"], r["predicted_label"], f"{r['confidence']:.6f}",
                    f"{r['given_label_probability']:.6f}", f"{r['loss']:.6f}"])  # fmt: skip
    from headstart.runs import atomic_write_bytes

    atomic_write_bytes(path, buf.getvalue().encode())


def read_metrics(path: Path) -> list[dict]:
    """metrics.csv rows as floats (empty when the run has no per-epoch log)."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


# ----------------------------------------------------------------------------- figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(metrics: list[dict], path: Path) -> None:
    """Loss and accuracy per epoch, train vs validation."""
    plt = _plt()
    ep = [m["epoch"] for m in metrics]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    for ax, key, title in ((axes[0], "loss", "loss"), (axes[1], "acc", "accuracy")):
        ax.plot(ep, [m[f"train_{key}"] for m in metrics], "o-", ms=3, label="train", color="#4c78a8")
        ax.plot(ep, [m[f"val_{key}"] for m in metrics], "o-", ms=3, label="validation", color="#f58518")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    axes[1].set_ylim(min(0.5, axes[1].get_ylim()[0]), 1.02)
    axes[0].legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_confusions(cm: np.ndarray, classes: list[str], path: Path) -> None:
    """Counts and row-normalised (recall per true class) side by side."""
    plt = _plt()
    n = len(classes)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    side = min(7.0, max(3.6, 0.45 * n + 2.2))
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 0.6, side), dpi=100)
    for ax, mat, title, fmt in ((axes[0], cm, "counts", "{:d}"), (axes[1], norm, "row-normalised", "{:.2f}")):
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        ticks = range(n)
        ax.set_xticks(ticks, classes, rotation=45 if n > 3 else 0, ha="right" if n > 3 else "center")
        ax.set_yticks(ticks, classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
        if n <= 20:
            for i in range(n):
                for j in range(n):
                    v = int(mat[i, j]) if fmt == "{:d}" else float(mat[i, j])
                    ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=9,
                            color="white" if norm[i, j] > 0.5 else "black")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_per_class(per_class: dict, path: Path) -> None:
    """Grouped bars of precision, recall and F1 per class."""
    plt = _plt()
    names = list(per_class)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(names) + 3), 3.4), dpi=100)
    for k, (key, color) in enumerate((("precision", "#4c78a8"), ("recall", "#f58518"), ("f1", "#54a24b"))):
        ax.bar(x + (k - 1) * 0.26, [per_class[c][key] for c in names], 0.26, label=key, color=color)
    ax.set_xticks(x, names, rotation=45 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center")
    ax.set_ylim(0, 1.05)
    ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_title("per-class precision, recall, F1")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_reliability(cal: dict, path: Path) -> None:
    """Reliability diagram: accuracy vs confidence per bin, before and after temperature scaling."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), dpi=100, sharey=True)
    for ax, key, title, ece in (
        (axes[0], "reliability_before", "before (T = 1)", cal["ece_before"]),
        (axes[1], "reliability_after", f"after (T = {cal['temperature']:.3f})", cal["ece_after"]),
    ):
        bins = [b for b in cal[key] if b["count"]]
        width = bins[0]["hi"] - bins[0]["lo"] if bins else 1 / 15
        ax.bar([b["lo"] for b in bins], [b["accuracy"] for b in bins], width=width, align="edge",
               color="#4c78a8", edgecolor="white", label="accuracy")  # fmt: skip
        ax.plot([0, 1], [0, 1], "--", color="#888888", lw=1, label="perfect calibration")
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="#f58518",
                ms=4, label="bin mean confidence")  # fmt: skip
        ax.set_title(f"{title}   ECE {ece:.4f}")
        ax.set_xlabel("confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.spines[["top", "right"]].set_visible(False)
    axes[0].set_ylabel("accuracy")
    axes[0].legend(frameon=False, loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------- HTML


def _b64(path: Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode()


def _thumb(path: str, size: int) -> str:
    """A JPEG data URI of the image, or '' when it cannot be read."""
    from headstart.data import load_image

    try:
        im = load_image(path, draft=size * 2)
    except Exception:  # noqa: BLE001 - a thumbnail is optional; the path is still listed
        return ""
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _num(key: str, value: float, digits: int = 4) -> str:
    """A number cell that tests (and people) can match against evaluation.json."""
    return f'<span class="num" id="{key}" data-value="{value!r}">{value:.{digits}f}</span>'


def _short(path: str) -> str:
    """class-folder/file name: enough to find the image, short enough for a tile."""
    p = Path(path)
    return f"{p.parent.name}/{p.name}"


def _fmt_int(v) -> str:
    return f"{v:,}" if isinstance(v, int) else html.escape(str(v))


CSS = """
:root { --fg:#1f2328; --muted:#59636e; --line:#d1d9e0; --bg:#f6f8fa; --accent:#4c78a8; --bad:#c0392b; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.5 -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif;
       color:var(--fg); background:#fff; }
main { max-width:1100px; margin:0 auto; padding:28px 32px 60px; }
h1 { font-size:26px; margin:0 0 4px; }
h2 { font-size:19px; margin:36px 0 10px; padding-bottom:6px; border-bottom:1px solid var(--line); }
.sub { color:var(--muted); margin:0 0 18px; word-break:break-all; }
.cards { display:grid; grid-template-columns:repeat(auto-fit,minmax(150px,1fr)); gap:12px; }
.card { background:var(--bg); border:1px solid var(--line); border-radius:8px; padding:12px 14px; }
.card .k { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.04em; }
.card .v { font-size:22px; font-weight:600; }
table { border-collapse:collapse; width:100%; font-size:14px; }
table.compact { width:auto; min-width:40%; }
th, td { text-align:left; padding:6px 10px; border-bottom:1px solid var(--line); vertical-align:top; }
th { background:var(--bg); font-weight:600; }
td.r, th.r { text-align:right; font-variant-numeric:tabular-nums; }
table.facts td:first-child { color:var(--muted); width:34%; }
img.fig { max-width:100%; height:auto; display:block; margin:8px 0; }
.gallery { display:grid; grid-template-columns:repeat(auto-fill,minmax(170px,1fr)); gap:14px; }
.tile { border:1px solid var(--line); border-radius:8px; overflow:hidden; background:#fff; }
.tile .im { height:150px; display:flex; align-items:center; justify-content:center; background:var(--bg); }
.tile img { max-width:100%; max-height:150px; }
.tile .cap { padding:8px 10px; font-size:13px; }
.tile .cap .path { color:var(--muted); font-size:11px; word-break:break-all; }
.wrong { color:var(--bad); font-weight:600; }
.ok { color:#2e7d32; font-weight:600; }
.note { color:var(--muted); font-size:13px; }
code { background:var(--bg); padding:1px 4px; border-radius:4px; font-size:13px; }
td.path { word-break:break-all; font-size:12px; }
"""


def render_html(**k) -> str:
    """The whole page as a string; every image is inlined as a data URI."""
    e = html.escape
    model, results, ev, cal = k["model"], k["results"], k["ev"], k["cal"]
    figs = k["figs"]
    backbone = model["backbone"]["name"]
    strategy = model.get("strategy", results.get("strategy", "?"))
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>headstart report: {e(str(k['run_dir']))}</title><style>{CSS}</style></head><body><main>",
        f"<h1>What the model learned</h1><p class='sub'>{e(str(k['run_dir']))} · {e(backbone)} · "
        f"{e(strategy)} · evaluated on {e(ev.get('data', ''))}</p>",
        "<section id='summary'><div class='cards'>",
        f"<div class='card'><div class='k'>accuracy</div><div class='v'>{_num('metric-accuracy', ev['accuracy'])}</div></div>",
        f"<div class='card'><div class='k'>loss</div><div class='v'>{_num('metric-loss', ev['loss'])}</div></div>",
        f"<div class='card'><div class='k'>macro F1</div><div class='v'>{_num('metric-macro_f1', ev['macro_f1'])}</div></div>",
        f"<div class='card'><div class='k'>ECE (T = {k['temperature']:.3f})</div>"
        f"<div class='v'>{_num('metric-ece', ev['ece'])}</div></div>",
        f"<div class='card'><div class='k'>images</div><div class='v'>{_num('metric-num_images', ev['num_images'], 0)}</div></div>",
        "</div></section>",
    ]  # fmt: skip
    parts += _facts(k, backbone, strategy)
    parts.append("<section id='curves'><h2>Training curves</h2>")
    if "curves" in figs:
        best = results.get("best_epoch")
        parts.append(
            f"<img class='fig' alt='training curves' src='data:image/png;base64,{_b64(figs['curves'])}'>"
        )
        if best:
            parts.append(f"<p class='note'>Weights saved from epoch {best} (best validation accuracy).</p>")
    else:
        parts.append("<p class='note'>This run has no per-epoch log (metrics.csv).</p>")
    parts.append("</section>")

    classes = ev["confusion_matrix"]["classes"]
    cm = ev["confusion_matrix"]["rows_true_cols_pred"]
    parts.append("<section id='confusion'><h2>Confusion matrix</h2>")
    parts.append(
        f"<img class='fig' alt='confusion matrices' src='data:image/png;base64,{_b64(figs['confusion'])}'>"
    )
    parts.append("<table id='confusion-table' class='compact'><tr><th>true \\ predicted</th>"
                 + "".join(f"<th class='r'>{e(c)}</th>" for c in classes) + "</tr>")  # fmt: skip
    for i, c in enumerate(classes):
        cells = "".join(
            f"<td class='r' data-cell='{i},{j}'>{v}</td>" if i != j else f"<td class='r' data-cell='{i},{j}'><b>{v}</b></td>"
            for j, v in enumerate(cm[i])
        )  # fmt: skip
        parts.append(f"<tr><th>{e(c)}</th>{cells}</tr>")
    parts.append("</table></section>")

    parts.append("<section id='per-class'><h2>Per-class metrics</h2><table><tr><th>class</th>"
                 "<th class='r'>precision</th><th class='r'>recall</th><th class='r'>F1</th>"
                 "<th class='r'>support</th></tr>")  # fmt: skip
    for i, (c, m) in enumerate(ev["per_class"].items()):
        parts.append(
            f"<tr><td>{e(c)}</td>"
            + "".join(f"<td class='r'>{_num(f'class{i}-{key}', m[key])}</td>" for key in ("precision", "recall", "f1"))
            + f"<td class='r'>{_num(f'class{i}-support', m['support'], 0)}</td></tr>"
        )  # fmt: skip
    parts.append("</table>")
    parts.append(
        f"<img class='fig' alt='per-class metrics' src='data:image/png;base64,{_b64(figs['per_class'])}'>"
    )
    parts.append("</section>")

    parts.append("<section id='calibration'><h2>Calibration</h2>")
    if cal:
        applied = (
            "This temperature is stored in <code>model.json</code>: <code>predict</code> reports the calibrated probabilities."
            if k["cal_applied"]
            else "Not applied yet: run <code>headstart calibrate RUN</code> to store it in <code>model.json</code>."
        )  # fmt: skip
        bound = (
            " The fit hit its bound (e.g. a perfectly separated validation set)." if cal["at_bound"] else ""
        )
        parts.append(
            "<p>Expected calibration error (15 equal-width confidence bins) on the same images: "
            f"<b>before</b> temperature scaling (T = 1) {_num('cal-ece_before', cal['ece_before'])}, "
            f"<b>after</b> (T = {_num('cal-temperature', cal['temperature'], 3)}) {_num('cal-ece_after', cal['ece_after'])}. "
            f"Negative log-likelihood {cal['nll_before']:.4f} → {cal['nll_after']:.4f}. {applied}{bound}</p>"
        )  # fmt: skip
        parts.append(
            f"<img class='fig' alt='reliability diagram' src='data:image/png;base64,{_b64(figs['reliability'])}'>"
        )
    else:
        parts.append("<p class='note'>No readable validation images: nothing to calibrate.</p>")
    parts.append("</section>")

    parts.append(f"<section id='top-losses'><h2>Top losses</h2><p class='note'>The {len(k['worst'])} images "
                 "with the highest loss (lowest probability for their given label).</p><div class='gallery'>")  # fmt: skip
    for r in k["worst"]:
        src = _thumb(r["path"], 220)
        im = f"<img alt='' src='{src}'>" if src else "<span class='note'>unreadable</span>"
        verdict = "wrong" if r["wrong"] else "ok"
        parts.append(
            f"<div class='tile'><div class='im'>{im}</div><div class='cap'>"
            f"given <b>{e(r['given_label'])}</b><br>predicted <span class='{verdict}'>{e(r['predicted_label'])}</span> "
            f"({r['confidence']:.3f})<br>p(given) {r['given_label_probability']:.3f} · loss {r['loss']:.2f}"
            f"<div class='path' title='{e(r['path'])}'>{e(_short(r['path']))}</div></div></div>"
        )  # fmt: skip
    parts.append("</div></section>")

    sus = k["suspects"]
    parts.append(f"<section id='suspect-labels'><h2>Likely label errors</h2><p>{len(sus)} validation images are "
                 f"predicted wrong with confidence ≥ {k['suspect_threshold']:.2f}; check their labels. "
                 "The full list is in <code>suspect_labels.csv</code>.</p>")  # fmt: skip
    if sus:
        parts.append(
            "<table><tr><th></th><th>path</th><th>given</th><th>predicted</th><th class='r'>confidence</th></tr>"
        )
        for r in sus[:30]:
            src = _thumb(r["path"], 64)
            im = f"<img alt='' src='{src}'>" if src else ""
            parts.append(
                f"<tr><td>{im}</td><td class='path'>{e(r['path'])}</td>"
                f"<td>{e(r['given_label'])}</td><td class='wrong'>{e(r['predicted_label'])}</td>"
                f"<td class='r'>{r['confidence']:.3f}</td></tr>"
            )  # fmt: skip
        parts.append("</table>")
        if len(sus) > 30:
            parts.append(f"<p class='note'>… and {len(sus) - 30} more in suspect_labels.csv.</p>")
    parts.append("</section>")
    parts.append("<p class='note' style='margin-top:40px'>Made by <code>headstart report</code>. "
                 "Figures are also saved as PNG files beside this page.</p></main></body></html>")  # fmt: skip
    return "\n".join(parts)


def _facts(k: dict, backbone: str, strategy: str) -> list[str]:
    e = html.escape
    r, cfg, ev, model = k["results"], k["config"], k["ev"], k["model"]
    split = k["split"] or {}

    def counts(which: str) -> str:
        items = split.get(which) or []
        classes = split.get("classes") or model["classes"]
        c = np.bincount([int(y) for _, y in items], minlength=len(classes)) if items else []
        return ", ".join(f"{e(n)} {int(v)}" for n, v in zip(classes, c, strict=False)) or "?"

    changed, checked = r.get("frozen_tensors_changed"), r.get("frozen_tensors_checked")
    proof = (
        f"<span class='ok'>passed</span>: {changed} of {checked} frozen tensors changed"
        if changed == 0
        else (f"<span class='wrong'>{changed} of {checked} frozen tensors changed</span>" if checked else "not recorded")
    )  # fmt: skip
    times = [f"{key.replace('_seconds', '').replace('_', ' ')} {r[key]:.1f}s"
             for key in ("train_seconds", "extract_seconds", "head_train_seconds", "train_loop_seconds")
             if isinstance(r.get(key), (int, float))]  # fmt: skip
    skipped = list(r.get("skipped_files", [])) + [
        s for s in ev.get("skipped_files", []) if s not in r.get("skipped_files", [])
    ]
    versions = cfg.get("versions", {})
    rows = [
        ("backbone", f"{e(backbone)} (weights: {e(str(model['backbone'].get('weights')))})"),
        ("strategy", e(strategy) + (f" · unfrozen: {e(', '.join(r['unfrozen_modules']))}" if r.get("unfrozen_modules") else "")),
        ("head", e(str(r.get("head", model["head"]["kind"])))),
        ("parameters", f"{_fmt_int(r.get('trainable_params', '?'))} trainable / {_fmt_int(r.get('frozen_params', '?'))} frozen"),
        ("frozen proof", proof),
        ("training images", f"{_fmt_int(r.get('num_train', '?'))} ({counts('train')})"),
        ("validation images", f"{_fmt_int(r.get('num_val', '?'))} ({counts('val')})"),
        ("best epoch", f"{r.get('best_epoch', '?')} of {r.get('epochs_run', '?')}; val accuracy at training "
                       f"{r['val_accuracy']:.4f}" if "val_accuracy" in r else "?"),
        ("times", e(", ".join(times)) or "?"),
        ("device", e(str(r.get("device", cfg.get("device", "?"))))),
        ("temperature", f"{k['temperature']:.4f}"),
        ("versions", e(", ".join(f"{n} {v}" for n, v in versions.items())) or "?"),
        ("skipped files", str(len(skipped)) + ("".join(f"<br><code>{e(s['path'])}</code>: {e(s['reason'])}" for s in skipped[:20]))),
    ]  # fmt: skip
    body = "".join(f"<tr><td>{a}</td><td>{b}</td></tr>" for a, b in rows)
    return [f"<section id='facts'><h2>Run facts</h2><table class='facts'>{body}</table></section>"]
