"""Command-line interface: a thin layer that turns flags into calls of the Python API."""

from __future__ import annotations

import argparse
import json
import os
import sys

from headstart.errors import HeadstartError


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", nargs="?", help="folder with train/ and val/ class subfolders, or one class tree")
    p.add_argument("--output", "-o", default=None, help="run folder (default: runs/NAME-STRATEGY)")
    p.add_argument("--val", default=None, help="separate validation folder of class subfolders")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="validation share when DATA is one class tree (stratified, seeded)",
    )
    _model_args(p)
    p.add_argument("--head", default="linear", help="linear | binary | mlp:H1,H2 (e.g. mlp:512,256)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout before head layers")
    _input_args(p)
    g = p.add_argument_group("optimisation")
    g.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="default by strategy: extract 30, finetune 8, full 8, scratch 15",
    )
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument(
        "--lr",
        type=float,
        default=None,
        help="head learning rate (default by strategy: 1e-3; full 3e-4; scratch 3e-3)",
    )
    g.add_argument(
        "--backbone-lr-mult",
        type=float,
        default=0.1,
        help="backbone lr = lr x this when fine-tuning",
    )
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--schedule", choices=["cosine", "step", "none"], default="cosine")
    g.add_argument("--step-size", type=int, default=None, help="epochs per x0.1 for --schedule step")
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--class-weights", choices=["none", "balanced"], default="none")
    g.add_argument(
        "--patience",
        type=int,
        default=None,
        help="early stop after this many epochs without val improvement",
    )
    a = p.add_argument_group("augmentation (training images)")
    a.add_argument(
        "--crop-scale", type=float, default=0.08, help="smallest area fraction of RandomResizedCrop"
    )
    a.add_argument("--no-hflip", action="store_true", help="no horizontal flips")
    a.add_argument("--vflip", action="store_true", help="also flip vertically (e.g. satellite)")
    a.add_argument("--rotation", type=float, default=0.0, help="max rotation in degrees")
    a.add_argument("--color-jitter", type=float, default=0.0, help="brightness/contrast/saturation")
    r = p.add_argument_group("run")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, mps")
    r.add_argument("--workers", type=int, default=None, help="DataLoader processes (default: cores-1)")
    r.add_argument(
        "--max-bad-fraction",
        type=float,
        default=0.05,
        help="stop if more than this share of images cannot be read",
    )
    r.add_argument("--overwrite", action="store_true", help="replace a finished run in --output")
    r.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        metavar="N",
        help="also checkpoint every N training steps (always: after every epoch)",
    )
    r.add_argument(
        "--resume",
        metavar="RUN",
        default=None,
        help="continue a stopped or killed run from RUN/checkpoint.pt, with its saved options",
    )
    r.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)")
    r.add_argument(
        "--cache-dir", default=None, help="feature cache (default: $HEADSTART_CACHE or ~/.cache/headstart)"
    )
    r.add_argument("--no-cache", action="store_true", help="compute features without the disk cache")
    r.add_argument(
        "--cache-views",
        type=int,
        default=1,
        metavar="K",
        help="extract/linear-probe: cache K views per training image, the eval view + K-1 augmented "
        "(default 1; see docs/speed.md)",
    )
    r.add_argument("--compile", action="store_true", help="torch.compile the frozen backbone (opt-in)")
    r.add_argument(
        "--cache-prefix",
        action="store_true",
        help="finetune: cache the frozen blocks' activations once, train only the rest (flips only)",
    )
    p.add_argument(
        "--classifier",
        choices=["logistic", "svm"],
        default="logistic",
        help="linear-probe: logistic regression or linear SVM (C by cross-validation)",
    )
    r.add_argument(
        "--calibrate", action="store_true", help="fit a temperature on the val split after training"
    )


def _input_args(p: argparse.ArgumentParser) -> None:
    """--image-size and --feature-blocks (train and compare)."""
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="input size instead of the backbone's (smaller is faster, e.g. for 32 px images)",
    )
    p.add_argument(
        "--feature-blocks",
        type=int,
        default=1,
        metavar="K",
        help="features = average-pooled outputs of the last K block groups, concatenated (default 1: "
        "the usual pooled features; earlier blocks can transfer better to unlike domains)",
    )


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backbone",
        "-b",
        default="efficientnet_lite0",
        help="efficientnet_lite0/1/2 (embedded), tv:NAME, timm:NAME, hf:ORG/REPO",
    )
    p.add_argument(
        "--weights",
        default=None,
        help="weights FILE (.safetensors/.pth), or 'none' for random init",
    )
    p.add_argument(
        "--strategy",
        "-s",
        default="extract",
        choices=["extract", "linear-probe", "finetune", "full", "scratch"],
    )
    p.add_argument("--unfreeze", type=int, default=2, help="finetune: number of last block groups to train")
    p.add_argument(
        "--unfreeze-pattern",
        action="append",
        default=[],
        help="finetune: also train modules whose name matches this regex (repeatable)",
    )


def cmd_train(a: argparse.Namespace) -> int:
    """headstart train."""
    from headstart.data import Augment
    from headstart.errors import ConfigError
    from headstart.train import resume, train

    if a.resume:
        if a.data:
            raise ConfigError(
                f"--resume {a.resume} continues that run with the options saved in it; "
                f"leave out DATA ({a.data!r})."
            )
        return _print_result(resume(a.resume))
    if not a.data:
        raise ConfigError("headstart train needs DATA (a folder of class subfolders), or --resume RUN.")
    output = a.output or os.path.join("runs", f"{os.path.basename(os.path.normpath(a.data))}-{a.strategy}")
    result = train(
        a.data,
        output=output,
        val=a.val,
        val_fraction=a.val_fraction,
        backbone=a.backbone,
        weights=a.weights,
        strategy=a.strategy,
        unfreeze=a.unfreeze,
        unfreeze_patterns=tuple(a.unfreeze_pattern),
        head=a.head,
        dropout=a.dropout,
        epochs=a.epochs,
        batch_size=a.batch_size,
        lr=a.lr,
        backbone_lr_mult=a.backbone_lr_mult,
        weight_decay=a.weight_decay,
        optimizer=a.optimizer,
        momentum=a.momentum,
        schedule=a.schedule,
        step_size=a.step_size,
        label_smoothing=a.label_smoothing,
        class_weights=a.class_weights,
        patience=a.patience,
        calibrate=a.calibrate,
        seed=a.seed,
        device=a.device,
        num_workers=a.workers,
        max_bad_fraction=a.max_bad_fraction,
        overwrite=a.overwrite,
        checkpoint_every=a.checkpoint_every,
        deterministic=a.deterministic,
        cache_dir=a.cache_dir,
        cache=not a.no_cache,
        classifier=a.classifier,
        image_size=a.image_size,
        compile=a.compile,
        cache_views=a.cache_views,
        cache_prefix=a.cache_prefix,
        feature_blocks=a.feature_blocks,
        augment=Augment(
            crop_scale=a.crop_scale,
            hflip=not a.no_hflip,
            vflip=a.vflip,
            rotation=a.rotation,
            color_jitter=a.color_jitter,
        ),
    )
    return _print_result(result)


def _print_result(result) -> int:
    r = result.results
    print(
        f"val_accuracy={r['val_accuracy']:.4f} val_loss={r['val_loss']:.4f} "
        f"best_epoch={r['best_epoch']} frozen_tensors_changed={r['frozen_tensors_changed']} "
        f"train_seconds={r['train_seconds']:.1f} run={result.run_dir}"
    )
    if "calibration" in r:
        _print_calibration(r["calibration"])
    return 0


def cmd_summary(a: argparse.Namespace) -> int:
    """headstart summary."""
    from headstart.summary import summarize

    print(summarize(a.backbone, strategy=a.strategy, unfreeze=a.unfreeze,
                    patterns=tuple(a.unfreeze_pattern), weights=a.weights,
                    num_classes=a.num_classes, depth=a.depth))  # fmt: skip
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    """headstart evaluate."""
    from headstart.evaluate import evaluate

    r = evaluate(a.run, data=a.data, device=a.device, batch_size=a.batch_size,
                 num_workers=a.workers)  # fmt: skip
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
    from headstart.predict import load

    if a.resume and not a.csv:
        from headstart.errors import ConfigError

        raise ConfigError("--resume needs --csv FILE: it skips the images already in that file.")
    if a.engine == "onnx":
        from headstart.onnx_predict import load_onnx

        predictor = load_onnx(a.run)
    else:
        predictor = load(a.run, device=a.device)
    if a.csv:
        from headstart.batch import predict_to_csv

        summary = predict_to_csv(predictor, a.inputs, a.csv, top_k=a.top_k, batch_size=a.batch_size,
                                 num_workers=a.workers, resume=a.resume)  # fmt: skip
        print(summary.describe())
        return 0
    preds = predictor.iter_predict(a.inputs, top_k=a.top_k, batch_size=a.batch_size,
                                   num_workers=a.workers)  # fmt: skip
    for p in preds:
        if p.error:
            print(f"{p.path}\tERROR\t{p.error}")
        else:
            pairs = "\t".join(f"{lab}\t{pr:.4f}" for lab, pr in zip(p.labels, p.probabilities, strict=True))
            print(f"{p.path}\t{pairs}")
    return 0


def cmd_doctor(a: argparse.Namespace) -> int:
    """headstart doctor."""
    from headstart.doctor import diagnose, format_report, input_size_of, quarantine

    report = diagnose(a.data, input_size=input_size_of(a.backbone), duplicates=not a.no_duplicates)
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
    from headstart.bench import bench

    r = bench(a.backbone, device=a.device, batch_size=a.batch_size, unfreeze=a.unfreeze,
              min_seconds=a.seconds)  # fmt: skip
    print(f"{r['backbone']} at {r['input_size']}px on {r['device']} ({r['threads']} threads), "
          f"batch {r['batch_size']}:")  # fmt: skip
    for k, v in r.items():
        if k.endswith("_img_s"):
            print(f"  {k.removesuffix('_img_s'):<20} {v:10.1f} images/s")
    return 0


def _print_calibration(c: dict) -> None:
    print(
        f"temperature={c['temperature']:.4f} ece_before={c['ece_before']:.4f} "
        f"ece_after={c['ece_after']:.4f} nll_before={c['nll_before']:.4f} nll_after={c['nll_after']:.4f}"
    )


def cmd_calibrate(a: argparse.Namespace) -> int:
    """headstart calibrate."""
    from headstart.calibrate import calibrate

    c = calibrate(a.run, data=a.data, device=a.device, batch_size=a.batch_size, num_workers=a.workers)
    _print_calibration(c)
    print(f"wrote temperature to {os.path.join(a.run, 'model.json')}; ECE in results.json")
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    """headstart report."""
    from headstart.report import build_report

    path = build_report(a.run, data=a.data, top_losses=a.top_losses,
                        suspect_threshold=a.suspect_threshold, device=a.device,
                        batch_size=a.batch_size, num_workers=a.workers)  # fmt: skip
    print(f"wrote {path} (figures and suspect_labels.csv beside it)")
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    """headstart compare."""
    from headstart.compare import compare

    res = compare(a.data, strategies=[s.strip() for s in a.strategies.split(",") if s.strip()],
                  backbones=[b.strip() for b in a.backbones.split(",") if b.strip()],
                  output=a.output, epochs=a.epochs, seed=a.seed, weights=a.weights,
                  batch_size=a.batch_size, val=a.val, device=a.device,
                  num_workers=a.workers, image_size=a.image_size,
                  feature_blocks=a.feature_blocks)  # fmt: skip
    print(res.markdown)
    print(f"wrote {res.markdown_path}, {res.csv_path}, {res.plot_path}")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    """headstart export."""
    from headstart.export import export

    r = export(a.run, format=a.format, output=a.output, opset=a.opset, check=not a.no_check,
               max_images=a.parity_images)  # fmt: skip
    print(f"exported {a.format} to {r.path} ({r.exporter}, {r.seconds:.1f}s); metadata {r.metadata_path}")
    if r.parity:
        print(r.parity.describe() + " -> ok")
        for s in r.parity.skipped:
            print(f"  parity skipped unreadable file {s}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="headstart",
        description="Transfer learning on image folders: feature extraction and fine-tuning.",
    )
    from headstart import __version__

    parser.add_argument("--version", action="version", version=f"headstart {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model on an image folder")
    _train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("doctor", help="find unusable, odd, duplicate and leaking files in a dataset")
    p.add_argument("data", help="dataset folder (train/ + val/ class subfolders, or one class tree)")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument(
        "--quarantine",
        metavar="DIR",
        default=None,
        help="move unusable files to DIR (relative paths kept, manifest written; nothing deleted)",
    )
    p.add_argument(
        "--backbone", "-b", default=None, help="judge tiny images against this backbone's input size"
    )
    p.add_argument("--no-duplicates", action="store_true", help="skip hashing (faster on huge sets)")
    p.add_argument("--limit", type=int, default=20, help="rows shown per section (JSON has all)")
    p.add_argument(
        "--strict", action="store_true", help="exit 1 if unusable files or leaking/conflicting duplicates"
    )
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("summary", help="layers, output shapes, params, trainable/frozen")
    p.add_argument("backbone", nargs="?", default="efficientnet_lite0")
    p.add_argument("--weights", default=None, help="weights FILE, or 'none'")
    p.add_argument(
        "--strategy",
        "-s",
        default=None,
        choices=["extract", "linear-probe", "finetune", "full", "scratch"],
        help="show the model after freezing for this strategy",
    )
    p.add_argument("--unfreeze", type=int, default=2)
    p.add_argument("--unfreeze-pattern", action="append", default=[])
    p.add_argument("--num-classes", type=int, default=2, help="classes of the head shown")
    p.add_argument("--depth", type=int, default=3, help="module nesting depth of the table")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("evaluate", help="metrics and confusion matrix of a trained run")
    p.add_argument("run", help="run folder made by `headstart train`")
    p.add_argument("--data", default=None, help="folder to evaluate on (default: the run's val split)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="predict labels for images or folders")
    p.add_argument("run", help="run folder made by `headstart train`")
    p.add_argument("inputs", nargs="+", help="image files and/or folders")
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--csv", default=None, help="write rows path,label,probability,... to this file")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument(
        "--engine",
        choices=["torch", "onnx"],
        default="torch",
        help="onnx: ONNX Runtime on RUN/model.onnx (or RUN given as a .onnx file); see `headstart export`",
    )
    p.add_argument("--resume", action="store_true", help="with --csv: skip images already in the file")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("bench", help="images/s for inference and training steps on a device")
    p.add_argument("backbone", nargs="?", default="efficientnet_lite0")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=None, help="default: 32 on CPU, 128 on GPU")
    p.add_argument("--unfreeze", type=int, default=2, help="block groups trained in the finetune step")
    p.add_argument("--seconds", type=float, default=3.0, help="time each measurement at least this long")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("calibrate", help="fit a temperature so probabilities match accuracy")
    p.add_argument("run", help="run folder made by `headstart train`")
    p.add_argument("--data", default=None, help="folder to fit on (default: the run's val split)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("report", help="write RUN/report.html: curves, errors, calibration, facts")
    p.add_argument("run", help="run folder made by `headstart train`")
    p.add_argument("--data", default=None, help="folder to report on (default: the run's val split)")
    p.add_argument("--top-losses", type=int, default=12, help="images in the top-losses gallery")
    p.add_argument(
        "--suspect-threshold",
        type=float,
        default=0.8,
        help="a wrong prediction at least this confident is listed in suspect_labels.csv",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compare", help="train several strategies/backbones on one split, tabulate")
    p.add_argument("data", help="folder with train/ and val/ class subfolders, or one class tree")
    p.add_argument("--strategies", default="scratch,linear-probe,extract,finetune", help="comma-separated")
    p.add_argument("--backbones", default="efficientnet_lite0", help="comma-separated backbone names")
    p.add_argument(
        "--output", "-o", default=None, help="folder for the table and runs (default: runs/compare-NAME)"
    )
    p.add_argument(
        "--epochs", type=int, default=None, help="epochs of backbone-training strategies (default: 2)"
    )
    p.add_argument("--weights", default=None, help="weights FILE for the backbone, or 'none'")
    p.add_argument("--val", default=None, help="separate validation folder of class subfolders")
    p.add_argument("--batch-size", type=int, default=32)
    _input_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=None)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("export", help="export a run to ONNX / TorchScript / safetensors, with a parity check")
    p.add_argument("run", help="run folder made by `headstart train`")
    p.add_argument("--format", "-f", choices=["onnx", "torchscript", "safetensors"], default="onnx")
    p.add_argument(
        "--output",
        "-o",
        default=None,
        help="file (folder for safetensors); default RUN/model.onnx, RUN/model.torchscript.pt, RUN/export/",
    )
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    p.add_argument("--parity-images", type=int, default=256, help="validation images for the parity check")
    p.add_argument("--no-check", action="store_true", help="skip the parity check (not recommended)")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a subcommand; user errors become one paragraph and an exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except HeadstartError as e:
        print(f"headstart: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("headstart: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
