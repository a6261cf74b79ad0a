"""Options declared once: TrainConfig fields <-> CLI flags, config files, typed API, strategy registry."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import yaml

import headstart
from headstart.cli import META_FLAGS, build_parser
from headstart.cli.fields import option_fields
from headstart.core.errors import ConfigError
from headstart.core.options import flag_of
from headstart.training.options import TrainConfig
from headstart.training.strategies import REGISTRY, public_names, select

from conftest import TINY, run_cli

FAST = dict(strategy="extract", backbone=TINY, weights="none", epochs=2, lr=0.05, batch_size=8, num_workers=0)


def _subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    out = {}
    for a in parser._actions:
        if isinstance(a, argparse._HelpAction) or a.dest in ("verbose", "quiet"):
            continue
        out[a.option_strings[0] if a.option_strings else a.dest] = a
    return out


def test_every_option_has_a_flag_and_every_flag_an_option():
    flags = _flags(_subparser("train"))
    fields = {flag_of(f): f for f, _ in option_fields(TrainConfig)}
    assert set(flags) - set(META_FLAGS) == set(fields)
    for flag, f in fields.items():  # the flag writes the field, with the field's help and default
        action = flags[flag]
        assert action.dest == f.name and f.metadata["help"] in action.help
        assert action.default is argparse.SUPPRESS  # a --config file can supply what is not given


def test_compare_takes_every_training_option_it_does_not_sweep():
    flags = set(_flags(_subparser("compare")))
    fields = {flag_of(f) for f, _ in option_fields(TrainConfig)}
    own = {"data", "--strategies", "--backbones", "--output", "--epochs"}
    assert fields - {"data", "--output", "--strategy", "--backbone", "--overwrite", "--epochs"} <= flags
    assert flags - fields <= own


def test_strategy_choices_come_from_the_registry():
    action = _flags(_subparser("train"))["--strategy"]
    names = ["extract", "linear-probe", "finetune", "full", "scratch", "auto"]
    assert list(action.choices) == public_names() == names
    assert set(REGISTRY) == set(public_names()) | {"finetune-cache-prefix"}
    assert select(TrainConfig(strategy="finetune", cache_prefix=True)).name == "finetune-cache-prefix"
    assert select(TrainConfig(strategy="finetune")).name == "finetune"


def test_defaults_and_checks_live_in_resolved():
    c = TrainConfig(data="d", strategy="full").resolved()
    assert (c.epochs, c.lr, c.output) == (8, 3e-4, "runs/d-full")
    for bad, match in (
        (dict(batch_size=0), "--batch-size has an invalid value: 0"),
        (dict(lr=0.0), "--lr has an invalid value"),
        (dict(image_size=16), "--image-size has an invalid value: 16"),
        (dict(optimizer="adam"), "--optimizer 'adam' is not a valid choice.*Did you mean: adamw"),
        (dict(head="mlp:x"), "hidden sizes"),
        (dict(crop_scale=0.0), "--crop-scale has an invalid value"),
        (dict(strategy="extract", cache_prefix=True), "only with --strategy finetune"),
        (dict(strategy="linear-probe", head="mlp:8"), "linear head"),
    ):
        with pytest.raises(ConfigError, match=match):
            TrainConfig(data="d").with_overrides(bad).resolved()


def test_wrong_option_names_answer_with_the_nearest(tiny_split, tmp_path):
    with pytest.raises(ConfigError, match="Unknown train option.*'batchsize'.*Did you mean: batch_size"):
        headstart.train(tiny_split, strategy="extract", output=tmp_path / "x", batchsize=4)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("epoch: 3\n")
    with pytest.raises(ConfigError, match="Did you mean: epochs"):
        headstart.train(tiny_split, strategy="extract", output=tmp_path / "x", config=cfg)


def test_flat_augmentation_options_and_typed_config(tiny_split, tmp_path):
    cfg = TrainConfig(**{**FAST, "strategy": "finetune"}).with_overrides({"hflip": False, "rotation": 10})
    assert cfg.augment.hflip is False and cfg.augment.rotation == 10 and cfg.strategy == "finetune"
    r = headstart.train(tiny_split, output=tmp_path / "r", config=cfg, epochs=1)
    options = json.loads((tmp_path / "r" / "config.json").read_text())["options"]
    assert options["augment"]["hflip"] is False and options["epochs"] == 1 and r.results.epochs_run == 1


def test_config_file_flags_override_it_and_config_json_reruns_a_run(tiny_split, tmp_path):
    cfg = tmp_path / "opts.yaml"
    cfg.write_text(yaml.safe_dump({**FAST, "data": str(tiny_split), "epochs": 3, "seed": 5}))
    r = run_cli("train", "--config", cfg, "--epochs", "2", "-o", tmp_path / "a", "-q")
    assert r.returncode == 0, r.stderr
    a = json.loads((tmp_path / "a" / "config.json").read_text())["options"]
    assert (a["epochs"], a["seed"], a["backbone"]) == (2, 5, TINY)  # the flag wins, the file fills the rest
    assert "features:" not in r.stderr and "done:" not in r.stderr  # -q: no progress, no info lines
    # the saved config.json re-runs the run: same options, same weights
    r = run_cli("train", "--config", tmp_path / "a" / "config.json", "-o", tmp_path / "b", "-q")
    assert r.returncode == 0, r.stderr
    b = json.loads((tmp_path / "b" / "config.json").read_text())["options"]
    assert {k: v for k, v in a.items() if k != "output"} == {k: v for k, v in b.items() if k != "output"}
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()


def test_print_config_prints_yaml_that_loads_back(tiny_split, tmp_path):
    r = run_cli(
        "train",
        tiny_split,
        "--strategy",
        "finetune",
        "--no-hflip",
        "--unfreeze-pattern",
        "x",
        "--print-config",
    )
    assert r.returncode == 0, r.stderr
    printed = yaml.safe_load(r.stdout)
    assert printed["strategy"] == "finetune" and printed["augment"]["hflip"] is False
    assert printed["unfreeze_patterns"] == ["x"] and printed["data"] == str(tiny_split)
    assert TrainConfig.from_dict(printed, strict=True) == TrainConfig(
        data=str(tiny_split), strategy="finetune", unfreeze_patterns=("x",)
    ).with_overrides({"hflip": False})
    assert not (tmp_path / "runs").exists()


def test_library_is_silent_unless_logging_is_configured(tiny_split, tmp_path, capfd):
    headstart.train(tiny_split, output=tmp_path / "quiet", **FAST)
    assert capfd.readouterr().err == ""
    import io

    stream = io.StringIO()
    headstart.configure_logging(0, stream=stream)  # conftest restores the library default afterwards
    headstart.train(tiny_split, output=tmp_path / "loud", **FAST)
    assert "features:" in stream.getvalue() and "done: val accuracy" in stream.getvalue()


def test_every_registered_strategy_trains_and_records_one_run_record(tiny_split, tmp_path):
    """The plug-ins share setup and finish: every one writes the same results.json keys."""
    keys = None
    for name, plugin in REGISTRY.items():
        if hasattr(plugin, "choose"):  # auto trains one of the others (tests/test_auto.py)
            continue
        opts = dict(FAST, strategy=plugin.variant[0] if plugin.variant else name, epochs=1)
        if plugin.variant:
            opts[plugin.variant[1]] = True
        r = headstart.train(tiny_split, output=tmp_path / name, calibrate=True, **opts)
        d = json.loads((tmp_path / name / "results.json").read_text())
        assert d["strategy"] == opts["strategy"] and d["frozen_tensors_changed"] == 0
        assert (
            d["calibration"]["temperature"]
            == json.loads((tmp_path / name / "model.json").read_text())["temperature"]
        )
        assert r.results == headstart.RunResults.read(tmp_path / name)
        common = {k for k in d if not k.startswith(("probe_", "prefix_", "classifier", "cache_prefix"))}
        common -= {
            "cache_hit_rate",
            "features_extracted",
            "features_from_cache",
            "head_train_seconds",
            "train_loop_seconds",
            "cache_rows_recomputed",
            "frozen_engine",  # like the cache figures: only strategies fed by frozen features or maps
        }
        keys = common if keys is None else keys
        assert common == keys, name


def test_results_schema_is_documented_from_the_record():
    from conftest import ROOT

    doc = (ROOT / "docs" / "run-folder.md").read_text()
    for name, _, meaning in headstart.RunResults.schema():
        assert f"| `{name}` |" in doc and meaning in doc, name
    assert {f.name for f in dataclasses.fields(headstart.RunResults)} == {
        n for n, _, _ in headstart.RunResults.schema()
    }


def test_config_values_are_type_checked_and_yaml_numbers_converted(tiny_split, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 1e-3\nepochs: 2\nunfreeze_patterns: [conv_head]\n")  # YAML reads 1e-3 as text
    c = headstart.TrainConfig.from_dict(yaml.safe_load(cfg.read_text()), strict=True)
    c = c.with_overrides({"data": str(tiny_split)}).resolved()
    assert (c.lr, c.epochs, c.unfreeze_patterns) == (1e-3, 2, ("conv_head",))
    for bad, match in (
        ({"epochs": "two"}, "--epochs expects an integer; received 'two'"),
        ({"epochs": 2.5}, "--epochs expects an integer"),
        ({"overwrite": "yes"}, "--overwrite is true or false"),
        (
            {"unfreeze_patterns": "conv_head"},
            r"unfreeze_patterns \(--unfreeze-pattern\) expects a list of strings",
        ),
        ({"hflip": 1}, r"hflip \(--no-hflip\) is true or false"),
        ({"batch_size": None}, "--batch-size cannot be empty"),
    ):
        with pytest.raises(ConfigError, match=match):
            TrainConfig(data="d").with_overrides(bad).resolved()
