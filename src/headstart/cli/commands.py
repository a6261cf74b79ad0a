"""The subcommands: each turns parsed flags into one call of the Python API and prints the result."""

from __future__ import annotations

import argparse
import json
import os

from headstart.cli.fields import given
from headstart.core.errors import ConfigError


def cmd_train(a: argparse.Namespace) -> int:
    """headstart train."""
    from headstart.training.options import as_config
    from headstart.training.run import resume, run

    options = given(a, a.option_dests)
    if a.resume:
        other = sorted(set(options) - {"num_workers"}) + (["--config"] if a.config else [])
        if other:
            raise ConfigError(
                f"--resume {a.resume} continues that run with the options saved in it; only --workers may "
                f"change. Leave out {', '.join(other)}."
            )
        return _print_result(resume(a.resume, num_workers=options.get("num_workers")))
    cfg = as_config(a.config).with_overrides(options)
    if a.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    return _print_result(run(cfg))


def _print_result(result) -> int:
    r = result.results
    print(
        f"val_accuracy={r.val_accuracy:.4f} val_loss={r.val_loss:.4f} best_epoch={r.best_epoch} "
        f"frozen_tensors_changed={r.frozen_tensors_changed} train_seconds={r.train_seconds:.1f} "
        f"run={result.run_dir}"
    )
    if r.calibration is not None:
        _print_calibration(r.calibration)
    return 0


def _print_calibration(c: dict) -> None:
    print(
        f"temperature={c['temperature']:.4f} ece_before={c['ece_before']:.4f} "
        f"ece_after={c['ece_after']:.4f} nll_before={c['nll_before']:.4f} nll_after={c['nll_after']:.4f}"
    )


def cmd_compare(a: argparse.Namespace) -> int:
    """headstart compare."""
    from headstart.insight.compare import compare

    options = given(a, a.option_dests)
    res = compare(
        a.data,
        strategies=[s.strip() for s in a.strategies.split(",") if s.strip()],
        backbones=[b.strip() for b in a.backbones.split(",") if b.strip()],
        output=a.output,
        epochs=a.epochs,
        **options,
    )
    print(res.markdown)
    print(f"wrote {res.markdown_path}, {res.csv_path}, {res.plot_path}")
    return 0


def cmd_backbones(a: argparse.Namespace) -> int:
    """headstart backbones."""
    from headstart.models.backbones import list_backbones

    rows = [e for e in list_backbones(family=a.family) if e.weights or not a.available]
    width = max([len(e.name) for e in rows] + [4]) + 2
    print(f"{'name':<{width}}{'family':<13}weights on this machine")
    for e in rows:
        print(f"{e.name:<{width}}{e.family:<13}{e.weights or '-'}")
    here = sum(1 for e in rows if e.weights)
    print(
        f"{len(rows)} backbones, {here} with weights here; others: --weights FILE, or copy the cache "
        "(`headstart train` says where it looked)"
    )
    return 0


def cmd_summary(a: argparse.Namespace) -> int:
    """headstart summary."""
    from headstart.insight.summary import summarize

    print(
        summarize(
            a.backbone,
            strategy=a.strategy,
            unfreeze=a.unfreeze,
            patterns=tuple(a.unfreeze_patterns or ()),
            weights=a.weights,
            num_classes=a.num_classes,
            depth=a.depth,
        )
    )
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    """headstart evaluate."""
    from headstart.insight.evaluate import evaluate

    r = evaluate(a.run, data=a.data, device=a.device, batch_size=a.batch_size, num_workers=a.num_workers)
    print(f"accuracy={r['accuracy']:.4f} loss={r['loss']:.4f} images={r['num_images']}")
    width = max(len(c) for c in r["per_class"]) + 2
    print(f"{'class':<{width}}precision  recall  f1      support")
    for c, m in r["per_class"].items():
        print(f"{c:<{width}}{m['precision']:<11.4f}{m['recall']:<8.4f}{m['f1']:<8.4f}{m['support']}")
    cm = r["confusion_matrix"]
    print("confusion matrix (rows true, cols predicted):", json.dumps(cm["rows_true_cols_pred"]))
    if r["skipped_files"]:
        print(f"skipped {len(r['skipped_files'])} unreadable files (see evaluation.json)")
    print(f"wrote {os.path.join(a.run, 'evaluation.json')} and confusion_matrix.png")
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    """headstart predict."""
    from headstart.data.layout import image_paths
    from headstart.inference.onnx import open_predictor

    if a.resume and not a.csv:
        raise ConfigError("--resume needs --csv FILE: it skips the images already in that file.")
    predictor = open_predictor(a.run, engine=a.engine, device=a.device, tta=a.tta)
    predictor.require(sets=a.sets, reject=a.reject)
    if a.csv:
        from headstart.deploy.batch import predict_to_csv

        summary = predict_to_csv(
            predictor,
            a.inputs,
            a.csv,
            top_k=a.top_k,
            batch_size=a.batch_size,
            num_workers=a.num_workers,
            resume=a.resume,
            sets=a.sets,
            reject=a.reject,
        )
        print(summary.describe())
        return 0
    paths = image_paths(a.inputs)
    for p in predictor.predict_paths(
        paths, top_k=a.top_k, batch_size=a.batch_size, num_workers=a.num_workers, reject=a.reject
    ):
        if p.error:
            print(f"{p.path}\tERROR\t{p.error}")
            continue
        pairs = "\t".join(f"{lab}\t{pr:.4f}" for lab, pr in zip(p.labels, p.probabilities, strict=True))
        if p.unknown:
            pairs = f"unknown\t(closest: {pairs})"
        extra = f"\tset={{{', '.join(p.set)}}}" if a.sets else ""
        print(f"{p.path}\t{pairs}{extra}")
    return 0


def cmd_doctor(a: argparse.Namespace) -> int:
    """headstart doctor."""
    from headstart.data.doctor import diagnose, format_report, quarantine

    size = 224
    if a.backbone:  # judge tiny images against this backbone's input size (no weights needed)
        from headstart.models.backbones import create_backbone

        size = create_backbone(a.backbone, weights="none").config.input_size
    report = diagnose(a.data, input_size=size, duplicates=not a.no_duplicates)
    moved = quarantine(report, a.quarantine) if a.quarantine else []
    if a.json:
        print(json.dumps(report.to_dict() | ({"quarantined": moved} if a.quarantine else {}), indent=2))
    else:
        print(format_report(report, limit=a.limit))
        if a.quarantine:
            print(
                f"quarantine: moved {len(moved)} unusable files to {a.quarantine} (manifest quarantine.json)"
            )
    return 1 if a.strict and report.problems else 0


def cmd_bench(a: argparse.Namespace) -> int:
    """headstart bench."""
    from headstart.insight.bench import bench

    r = bench(
        a.backbone,
        weights=a.weights,
        device=a.device,
        batch_size=a.batch_size,
        unfreeze=a.unfreeze,
        min_seconds=a.seconds,
    )
    print(
        f"{r['backbone']} at {r['input_size']}px on {r['device']} ({r['threads']} threads), "
        f"batch {r['batch_size']}:"
    )
    for k, v in r.items():
        if k.endswith("_img_s"):
            print(f"  {k.removesuffix('_img_s'):<20} {v:10.1f} images/s")
    return 0


def cmd_calibrate(a: argparse.Namespace) -> int:
    """headstart calibrate."""
    from headstart.insight.calibrate import calibrate

    c = calibrate(
        a.run, data=a.data, device=a.device, batch_size=a.batch_size, num_workers=a.num_workers,
        coverage=None if a.no_sets else a.coverage, method=a.method, accept=None if a.no_reject else a.accept,
    )  # fmt: skip
    _print_calibration(c)
    if "sets" in c:
        s, h = c["sets"], c["sets"]["held_out"]
        print(f"sets ({s['method']}, target coverage {s['coverage']:.2f}): held-out coverage "
              f"{h['coverage_mean']:.4f} +- {h['coverage_std']:.4f}, mean set size {h['set_size_mean']:.2f}"
              f" ({h['rounds']} random halves of {s['calibration_images']} images)")  # fmt: skip
        if "warning" in s:
            print(f"warning: {s['warning']}")
    if "ood" in c:
        o, h = c["ood"], c["ood"]["held_out"]
        print(f"rejection (accept {o['accept']:.2f}): threshold {o['threshold']:.1f} on {o['train_images']} "
              f"training images' statistics; held-out acceptance {h['acceptance_mean']:.4f} +- "
              f"{h['acceptance_std']:.4f}")  # fmt: skip
        if "warning" in o:
            print(f"warning: {o['warning']}")
    print(f"wrote {os.path.join(a.run, 'model.json')}; numbers in results.json")
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    """headstart report."""
    from headstart.insight.report import build_report

    path = build_report(
        a.run,
        data=a.data,
        top_losses=a.top_losses,
        suspect_threshold=a.suspect_threshold,
        device=a.device,
        batch_size=a.batch_size,
        num_workers=a.num_workers,
    )
    print(f"wrote {path} (figures and suspect_labels.csv beside it)")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    """headstart export."""
    from headstart.deploy.export import export
    from headstart.deploy.quantize import VNNI

    r = export(
        a.run,
        format=a.format,
        output=a.output,
        opset=a.opset,
        check=not a.no_check,
        max_images=a.parity_images,
        quantize=a.quantize,
        gate={"calibration_images": a.calibration_images, "min_agreement": a.min_agreement,
              "max_drop": a.max_drop, "bias_correction": not a.no_bias_correction},
    )  # fmt: skip
    print(f"exported {a.format} to {r.path} ({r.exporter}, {r.seconds:.1f}s); metadata {r.metadata_path}")
    if r.parity:
        print(r.parity.describe() + " -> ok")
        for s in r.parity.skipped:
            print(f"  parity skipped unreadable file {s}")
    if r.int8:
        q = r.int8
        for attempt in q.attempts:
            print(f"int8 gate on {q.validation_images} validation images: {attempt.describe()}")
        print(f"wrote {q.path}: {q.int8_bytes / 1e6:.1f} MB vs {q.float_bytes / 1e6:.1f} MB float "
              f"({q.float_bytes / q.int8_bytes:.1f}x smaller), {q.int8_img_s:.0f} vs {q.float_img_s:.0f} "
              f"images/s model-only on this machine ({q.int8_img_s / q.float_img_s:.2f}x)")  # fmt: skip
        if q.cpu in VNNI:
            print(f"note: the gate ran on a CPU with {q.cpu}. x86 CPUs without VNNI run int8 with "
                  "instructions that can saturate, so the model may lose accuracy there that this gate "
                  "did not see: run the export on such a CPU to gate it there "
                  "(docs/export-and-scale.md).")  # fmt: skip
    return 0


def cmd_cache(a: argparse.Namespace) -> int:
    """headstart cache info|prune|clear."""
    import time

    from headstart.features.cache import default_cache_dir
    from headstart.features.maintenance import cache_entries, clear, prune

    root = a.cache_dir or default_cache_dir()
    if a.action == "info":
        entries = cache_entries(root)
        print(f"{'key':<26}{'backbone':<24}{'weights':<14}{'rows':>9}{'MB':>10}  last used   views")
        for e in entries:
            used = time.strftime("%Y-%m-%d", time.localtime(e.last_used)) if e.last_used else "?"
            size = f"{e.bytes / 1e6:>10.1f}"
            print(f"{e.key:<26}{e.backbone[:23]:<24}{e.weights:<14}{e.rows:>9}{size}  {used:<11} {e.views}")
        print(f"{len(entries)} entries, {sum(e.bytes for e in entries) / 1e6:.1f} MB in {root}")
    elif a.action == "prune":
        r = prune(root, older_than_days=a.older_than)
        print(
            f"removed {r['temporaries']} temporaries of killed runs, {r['unreferenced shards']} unreferenced "
            f"and {r['quarantined shards']} quarantined shards, {r['entries']} unused entries: "
            f"{r['bytes'] / 1e6:.1f} MB freed in {root}"
        )
    else:
        print(f"removed every entry: {clear(root) / 1e6:.1f} MB freed in {root}")
    return 0


def cmd_plan(a: argparse.Namespace) -> int:
    """headstart plan."""
    from headstart.training.auto.preview import preview
    from headstart.training.options import TrainConfig

    cfg = TrainConfig(strategy="auto").with_overrides(given(a, a.option_dests)).resolved()
    p = preview(cfg)
    prof, sp = p["profile"], p["speed"]
    print(
        f"data: {prof['num_train']} train / {prof['num_val']} val images, {prof['classes']} classes "
        f"(smallest {prof['smallest_class']}), median shorter side {prof['short_side']} px"
    )
    print(
        f"machine: {sp['device']}, {sp['threads']} threads, {sp['workers']} loader workers; measured in "
        f"{sp['seconds']:.1f}s"
    )
    held_out = "3 folds" if p["folds"] == 3 else "one 80/20 split"
    metric = p["selected_by"].replace("_", " ")
    print(
        f"budget {p['budget_seconds'] / 60:.1f} min; candidates are scored by {metric} on {held_out} of "
        "the training images (the validation split is read once, by the final model)"
    )
    pilots = (
        f"{p['pilot_images']} training + {p['pilot_val_images']} held-out images, predicted "
        f"{p['pilot_seconds']:.0f}s"
        + (
            f" (shared frozen passes {p['shared_pass_seconds']:.0f}s, then the pilots)"
            if p["shared_pass_seconds"]
            else ""
        )
        if p["pilot_images"]
        else "none affordable"
    )
    print(
        f"stage 1, pilots (2 epochs): {pilots}; stage 2: the best third on more images; then the winner "
        "on the training split with the epochs the budget leaves"
    )
    print(f"{'candidate':<62}{'pilot s':>9}{'final epochs':>14}{'images':>8}{'final s':>9}")
    for r in p["candidates"]:
        pilot = f"{r['pilot_seconds']:.0f}" if r["pilot_seconds"] is not None else "-"
        mark = "" if r["piloted"] else "  (left out: short budget)" if r["affordable"] else "  (over budget)"
        print(
            f"{r['name'][:61]:<62}{pilot:>9}{r['final_epochs']:>14}{r['final_images']:>8}"
            f"{r['final_seconds']:>9.0f}{mark}"
        )
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    """headstart serve."""
    from headstart.core.options import checked
    from headstart.deploy.serve import check_exposure, serve
    from headstart.deploy.serve_http import ServeConfig

    options = given(a, a.option_dests)
    options["api_key"] = options.get("api_key") or os.environ.get("HEADSTART_API_KEY") or None
    cfg = checked(ServeConfig(**options))
    check_exposure(a.host, cfg.api_key)
    print(f"serving {a.run} on http://{a.host}:{a.port}/ (Ctrl-C or SIGTERM drains and stops)", flush=True)
    serve(a.run, cfg, host=a.host, port=a.port, workers=a.workers)
    return 0
