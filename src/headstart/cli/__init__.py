"""Command-line interface: a thin layer that turns flags into calls of the Python API.

The `train` and `compare` options are generated from TrainConfig's fields (headstart.cli.fields);
the other subcommands reuse those declarations where they take the same option.
"""

from __future__ import annotations

import argparse
import os
import sys

from headstart.cli import commands as c
from headstart.cli.fields import add_fields
from headstart.core.errors import HeadstartError
from headstart.core.logs import configure

RUN_HELP = "run folder made by `headstart train`"
# train's flags that are not TrainConfig options: they say where the options come from
META_FLAGS = ("--config", "--print-config", "--resume")


def _train_parser(p: argparse.ArgumentParser) -> None:
    from headstart.training.options import TrainConfig

    p.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        default=None,
        help="options from a YAML or JSON file (a run's config.json re-runs it); flags override it",
    )
    p.add_argument("--print-config", action="store_true", help="print the options as YAML and exit")
    p.add_argument(
        "--resume",
        metavar="RUN",
        default=None,
        help="continue a stopped or killed run from RUN/checkpoint.pt, with its saved options",
    )
    p.set_defaults(option_dests=add_fields(p, TrainConfig, suppress=True), func=c.cmd_train)


def _compare_parser(p: argparse.ArgumentParser) -> None:
    from headstart.insight.compare import DEFAULT_STRATEGIES
    from headstart.training.options import TrainConfig

    p.add_argument("data", help="folder with train/ and val/ class subfolders, or one class tree")
    p.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES), help="comma-separated")
    p.add_argument("--backbones", default="efficientnet_lite0", help="comma-separated backbone names")
    p.add_argument(
        "--output", "-o", default=None, help="folder for the table and runs (default: runs/compare-NAME)"
    )
    p.add_argument(
        "--epochs", type=int, default=None, help="epochs of backbone-training strategies (default: 2)"
    )
    dests = add_fields(
        p,
        TrainConfig,
        exclude=("data", "output", "strategy", "backbone", "overwrite", "epochs"),
        suppress=True,
    )
    p.set_defaults(option_dests=dests, func=c.cmd_compare)


def _eval_options(p: argparse.ArgumentParser, *, batch_size: int = 64) -> None:
    """--data, --device, --batch-size, --workers of the commands that run a trained model."""
    from headstart.training.options import TrainConfig

    p.add_argument("run", help=RUN_HELP)
    p.add_argument("--data", default=None, help="folder of class subfolders (default: the run's val split)")
    add_fields(
        p, TrainConfig, only=("device", "batch_size", "num_workers"), defaults={"batch_size": batch_size}
    )


def _doctor_parser(p: argparse.ArgumentParser) -> None:
    from headstart.training.options import TrainConfig

    p.add_argument("data", help="dataset folder (train/ + val/ class subfolders, or one class tree)")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument(
        "--quarantine",
        metavar="DIR",
        default=None,
        help="move unusable files to DIR (relative paths kept, manifest written; nothing deleted)",
    )
    add_fields(p, TrainConfig, only=("backbone",), defaults={"backbone": None})
    p.add_argument("--no-duplicates", action="store_true", help="skip hashing (faster on huge sets)")
    p.add_argument("--limit", type=int, default=20, help="rows shown per section (JSON has all)")
    p.add_argument(
        "--strict", action="store_true", help="exit 1 if unusable files or leaking/conflicting duplicates"
    )
    p.set_defaults(func=c.cmd_doctor)


def _backbones_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", choices=["embedded", "torchvision", "timm", "hf"], default=None)
    p.add_argument("--available", action="store_true", help="only backbones whose weights are here")
    p.set_defaults(func=c.cmd_backbones)


def _summary_parser(p: argparse.ArgumentParser) -> None:
    from headstart.training.options import TrainConfig

    add_fields(
        p,
        TrainConfig,
        only=("backbone", "weights", "strategy", "unfreeze", "unfreeze_patterns"),
        defaults={"strategy": None},
        positional=("backbone",),
    )
    p.add_argument("--num-classes", type=int, default=2, help="classes of the head shown")
    p.add_argument("--depth", type=int, default=3, help="module nesting depth of the table")
    p.set_defaults(func=c.cmd_summary)


def _predict_parser(p: argparse.ArgumentParser) -> None:
    from headstart.models.tta import TTA_CHOICES
    from headstart.training.options import TrainConfig

    p.add_argument("run", help=RUN_HELP)
    p.add_argument("inputs", nargs="+", help="image files and/or folders")
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--csv", default=None, help="write rows path,label,probability,... to this file")
    add_fields(p, TrainConfig, only=("device", "batch_size", "num_workers"))
    p.add_argument(
        "--engine",
        choices=["torch", "onnx"],
        default="torch",
        help="onnx: ONNX Runtime on RUN/model.onnx (or RUN given as a .onnx file); see `headstart export`",
    )
    p.add_argument("--resume", action="store_true", help="with --csv: skip images already in the file")
    p.add_argument(
        "--sets",
        action="store_true",
        help="add each image's conformal prediction set (fitted by `headstart calibrate`)",
    )
    p.add_argument(
        "--reject",
        action="store_true",
        help="label images that look like none of the classes 'unknown' (fitted by calibrate)",
    )
    p.add_argument(
        "--tta",
        choices=TTA_CHOICES,
        default=None,
        help="test-time views (default: as trained); none halves the work of an hflip model, and "
        "turns its prediction sets and rejection off (they were fitted on the trained views)",
    )
    p.set_defaults(func=c.cmd_predict)  # fmt: skip


def _bench_parser(p: argparse.ArgumentParser) -> None:
    from headstart.training.options import TrainConfig

    add_fields(
        p,
        TrainConfig,
        only=("backbone", "weights", "device", "unfreeze"),
        defaults={"weights": "none"},
        positional=("backbone",),
    )
    p.add_argument("--batch-size", type=int, default=None, help="default: 32 on CPU, 128 on GPU")
    p.add_argument("--seconds", type=float, default=3.0, help="time each measurement at least this long")
    p.set_defaults(func=c.cmd_bench)


def _evaluate_parser(p: argparse.ArgumentParser) -> None:
    _eval_options(p)
    p.set_defaults(func=c.cmd_evaluate)


def _calibrate_parser(p: argparse.ArgumentParser) -> None:
    from headstart.inference.uncertainty import SET_METHODS

    _eval_options(p)
    p.add_argument(
        "--coverage",
        type=float,
        default=0.95,
        help="prediction sets hold the true label this often (predict --sets)",
    )
    p.add_argument(
        "--method",
        choices=SET_METHODS,
        default="lac",
        help="set score: lac (smallest sets) or aps (sets grow with uncertainty, never empty)",
    )
    p.add_argument(
        "--accept",
        type=float,
        default=0.95,
        help="share of in-distribution images that rejection accepts (predict --reject)",
    )
    p.add_argument("--no-sets", action="store_true", help="fit the temperature and rejection only")
    p.add_argument(
        "--no-reject",
        action="store_true",
        help="skip rejection (it needs one pass over up to 2000 training images)",
    )
    p.set_defaults(func=c.cmd_calibrate)  # fmt: skip


def _report_parser(p: argparse.ArgumentParser) -> None:
    _eval_options(p)
    p.add_argument("--top-losses", type=int, default=12, help="images in the top-losses gallery")
    p.add_argument(
        "--suspect-threshold",
        type=float,
        default=0.8,
        help="a wrong prediction at least this confident is listed in suspect_labels.csv",
    )
    p.set_defaults(func=c.cmd_report)


def _export_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help=RUN_HELP)
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
    p.add_argument(
        "--quantize",
        choices=["int8"],
        default=None,
        help="also write RUN/model.int8.onnx: static int8, kept only if it passes the accuracy gate",
    )
    p.add_argument("--calibration-images", type=int, default=128, help="training images that calibrate int8")
    p.add_argument(
        "--min-agreement",
        type=float,
        default=0.99,
        help="int8 gate: share of validation images with the float model's top-1",
    )
    p.add_argument("--max-drop", type=float, default=0.5, help="int8 gate: accuracy points it may lose")
    p.add_argument(
        "--no-bias-correction",
        action="store_true",
        help="int8: keep the float biases (by default they absorb the int8 weights' mean shift)",
    )
    p.set_defaults(func=c.cmd_export)  # fmt: skip


def _plan_parser(p: argparse.ArgumentParser) -> None:
    from headstart.training.options import TrainConfig

    only = ("data", "budget", "backbone", "weights", "val", "val_fraction", "seed", "device", "class_weights")
    p.set_defaults(option_dests=add_fields(p, TrainConfig, only=only, suppress=True), func=c.cmd_plan)


def _serve_parser(p: argparse.ArgumentParser) -> None:
    from headstart.deploy.serve_http import ServeConfig

    p.add_argument("run", help="run folder made by `headstart train` (or a .onnx file with --engine onnx)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--workers", type=int, default=1, help="server processes, each with its own copy of the model"
    )
    p.set_defaults(option_dests=add_fields(p, ServeConfig), func=c.cmd_serve)


def _cache_parser(p: argparse.ArgumentParser) -> None:
    from headstart.training.options import TrainConfig

    p.add_argument(
        "action",
        choices=["info", "prune", "clear"],
        help="info: entries, sizes, last use; prune: remove leftovers of killed runs, unreferenced "
        "and quarantined shards (and with --older-than, entries unused that long); clear: all",
    )
    add_fields(p, TrainConfig, only=("cache_dir",))
    p.add_argument(
        "--older-than", type=float, default=None, metavar="DAYS", help="prune: entries unused this long"
    )
    p.set_defaults(func=c.cmd_cache)


COMMANDS = (
    ("train", "train a model on an image folder", _train_parser),
    ("doctor", "find unusable, odd, duplicate and leaking files in a dataset", _doctor_parser),
    ("backbones", "every known backbone name and whether its weights are on this machine", _backbones_parser),
    ("summary", "layers, output shapes, params, trainable/frozen", _summary_parser),
    ("evaluate", "metrics and confusion matrix of a trained run", _evaluate_parser),
    ("predict", "predict labels for images or folders", _predict_parser),
    ("bench", "images/s for inference and training steps on a device", _bench_parser),
    ("calibrate", "fit a temperature so probabilities match accuracy", _calibrate_parser),
    ("report", "write RUN/report.html: curves, errors, calibration, facts", _report_parser),
    ("compare", "train several strategies/backbones on one split, tabulate", _compare_parser),
    ("export", "export a run to ONNX / TorchScript / safetensors, with a parity check", _export_parser),
    ("cache", "show or clean the feature cache", _cache_parser),
    ("serve", "an HTTP prediction service with a web page", _serve_parser),
    ("plan", "what `--strategy auto` would try on DATA within --budget, and what each costs", _plan_parser),
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    from headstart import __version__

    parser = argparse.ArgumentParser(
        prog="headstart",
        description="Transfer learning on image folders: feature extraction and fine-tuning.",
    )
    parser.add_argument("--version", action="version", version=f"headstart {__version__}")
    common = argparse.ArgumentParser(add_help=False)  # -q / -v on every subcommand
    common.add_argument("-v", "--verbose", action="count", default=0, help="more log detail (-vv: debug)")
    common.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, build in COMMANDS:
        build(sub.add_parser(name, help=help_text, parents=[common]))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a subcommand; user errors become one paragraph and an exit code."""
    args = build_parser().parse_args(argv)
    configure(-1 if args.quiet else args.verbose)
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
