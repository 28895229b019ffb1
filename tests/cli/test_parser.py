"""The command's options: flags, YAML configs (and every wrong shape of one), help."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from jsonargparse import Namespace

from neurenix.cli import main
from neurenix.cli.parser import build_parser, check_settings, parse
from neurenix.cli.settings import BASELINES, METHOD_SETTINGS, METHODS, UsageError, seeds_of

EXAMPLE = Path(__file__).parents[2] / "examples" / "compare.yaml"


def test_a_yaml_config_gives_the_settings_the_flags_give(tmp_path):
    flags = ["--scenario", "task", "--methods", "si", "l2", "--epochs", "2", "--si.importance", "7.5", "--devices", "1"]
    config = tmp_path / "run.yaml"
    config.write_text("scenario: task\nmethods: [si, l2]\nepochs: 2\nsi:\n  importance: 7.5\ndevices: 1\n")
    parser = build_parser()
    from_flags = parser.parse_args(["compare", *flags]).compare
    from_file = parser.parse_args(["compare", "--config", str(config)]).compare
    assert from_file.pop("config") and from_flags.pop("config") is None
    assert from_file == from_flags
    assert from_file.si.importance == 7.5 and from_file.si.xi == METHOD_SETTINGS["si"]().xi  # unset keys keep defaults
    # flags after --config win
    assert parser.parse_args(["compare", "--config", str(config), "--epochs", "3"]).compare.epochs == 3


def test_the_example_config_and_a_printed_config_are_valid_settings(tmp_path, capsys):
    parser = build_parser()
    check_settings(parser.parse_args(["compare", "--config", str(EXAMPLE)]).compare)
    assert main(["--print_config", "--epochs", "2"]) == 0
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    assert main(["--config", str(printed), "--epochs", "0"]) == 2  # the printed file passes the file checks
    assert "--epochs must be >= 1, got 0" in capsys.readouterr().err
    assert parser.parse_args(["compare", "--config", str(printed)]).compare.epochs == 2


# What a user writes wrong in a config file, and what the one line on stderr must say after
# "neurenix: error: --config FILE: ". These were Python's own messages (`'str' object does not
# support item assignment`), an uncaught AttributeError (exit 1), or a run with the mistake in it.
WRONG_CONFIGS = [
    ("methods: ewc", "methods must be a list of method names, such as methods: [ewc]; got the string 'ewc'"),
    ("methods: 5", "methods must be a list of method names, such as methods: [ewc, replay]; got the number 5"),
    ("methods: {ewc: 1}", "methods must be a list of method names, such as methods: [ewc, replay]; got a mapping: {'ewc': 1}"),
    ("methods: [ewc, 5]", "methods must be a list of method names, such as methods: [ewc, replay]; got a list: ['ewc', 5]"),
    ("ewc: 5", "ewc must be a mapping of ewc's settings (importance, fisher_sample_size, fisher), such as "
               "'ewc: {importance: ...}'; got the number 5"),
    ("si: [1, 2]", "si must be a mapping of si's settings (importance, xi), such as 'si: {importance: ...}'; got a list: [1, 2]"),
    ("replay:", "replay has no value (null); give one, or leave the key out for its default"),
    ("ewc:\n  importance: 5\n  lambda: 1", "ewc has no setting 'lambda'; its settings: importance, fisher_sample_size, fisher"),
    ("ewc:\n  fisher_samples: 100", "ewc has no setting 'fisher_samples' (did you mean fisher_sample_size?); "
                                    "its settings: importance, fisher_sample_size, fisher"),
    ("l2:\n  importance:", "l2.importance has no value (null); give one, or leave the key out for its default"),
    ("epochs: null", "epochs has no value (null); give one, or leave the key out for its default"),
    ("batch-size: 8", "unknown setting 'batch-size' (did you mean batch_size?); neurenix --help lists them"),
    ("", 'holds no settings; write one "key: value" a line (neurenix --print_config prints them all)'),
    ("# nothing but a comment", 'holds no settings; write one "key: value" a line (neurenix --print_config prints them all)'),
    ("5", 'must be a YAML mapping of settings, one "key: value" a line, got the number 5'),
    ("- ewc\n- replay", "must be a YAML mapping of settings, one \"key: value\" a line, got a list: ['ewc', 'replay']"),
]


@pytest.mark.parametrize(("content", "says"), WRONG_CONFIGS)
def test_a_wrongly_shaped_config_file_is_a_bad_option_naming_the_key_and_what_it_expects(content, says, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(content + "\n")
    assert main(["--config", str(config), "--output", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"neurenix: error: --config {config}: {says}\n" and captured.out == ""
    assert not (tmp_path / "out").exists()


def test_an_inline_config_is_checked_as_a_file_is(tmp_path, capsys):
    assert main(["--config", "{methods: ewc}", "--output", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (
        "neurenix: error: --config {methods: ewc}: methods must be a list of method names, such as methods: [ewc]; "
        "got the string 'ewc'\n"
    )


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"ewc": 5}, "--ewc must be a mapping of ewc's settings (importance, fisher_sample_size, fisher), got the number 5"),
        ({"epochs": None}, "--epochs has no value (null); give one, or leave it out for its default"),
        ({"si.xi": None}, "--si.xi has no value (null); give one, or leave it out for its default"),
        ({"methods": "ewc"}, "--methods must be a list of method names, got the string 'ewc'"),
    ],
)
def test_settings_of_the_wrong_shape_from_any_source_are_refused(change, says):
    # A nested config file, or a route the file checks do not see, can still put them there.
    settings = build_parser().parse_args(["compare"]).compare
    for key, value in change.items():
        settings[key] = value
    with pytest.raises(UsageError) as error:
        check_settings(settings)
    assert str(error.value) == says


def test_the_default_settings_pass_and_every_method_has_its_settings():
    settings = build_parser().parse_args(["compare"]).compare
    check_settings(settings)
    assert all(isinstance(settings[name], Namespace) for name in METHOD_SETTINGS)
    assert settings.overwrite is False and settings.methods == list(METHODS)


def test_help_documents_every_option(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    options = ["--config", "--print_config", "--benchmark", "--dataset", "--data_root", "--download", "--scenario",
               "--num_tasks", "--methods", "--epochs", "--batch_size", "--lr", "--hidden", "--seed", "--seeds",
               "--keep_optimizer_state", "--mask_unseen_classes", "--accelerator", "--devices", "--strategy",
               "--keep_on_device", "--jobs",
               "--threads", "--output", "--overwrite"]
    for name, settings in METHOD_SETTINGS.items():
        options += [f"--{name}.{field.name}" for field in dataclasses.fields(settings)]
    missing = [option for option in options if not re.search(rf"{re.escape(option)}\b", text)]
    assert not missing
    assert all(method in text for method in METHODS) and "results.json" in text and "Exit status" in text
    flat = " ".join(text.split())
    assert "one run per folder" in flat and "Tasks are numbered from 0" in flat and "tensorboard/<method>" in flat
    assert "such as ddp_spawn and ddp_fork, are refused: use ddp" in flat


# ---------------------------------------------------------------------------- issue 18's options
def settings_of(*flags: str) -> Namespace:
    settings = build_parser().parse_args(["compare", *flags]).compare
    check_settings(settings)
    return settings


def test_seeds_come_from_seeds_or_seed_or_default_to_zero(tmp_path):
    assert seeds_of(settings_of()) == [0]
    assert seeds_of(settings_of("--seed", "4")) == [4]
    assert seeds_of(settings_of("--seeds", "3", "0", "1")) == [3, 0, 1]
    config = tmp_path / "run.yaml"
    config.write_text("seeds: [0, 1, 2]\n")
    assert seeds_of(settings_of("--config", str(config))) == [0, 1, 2]


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--seed", "1", "--seeds", "0", "2"], "--seed 1 and --seeds 0 2 both given: give --seed for one seed, or --seeds for several"),
        (["--seeds", "0", "1", "0"], "--seeds lists 0 more than once"),
        (["--seeds", "0", "-1"], "--seeds must be in [0, 2**32), got -1"),
        (["--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
        (["--jobs", "0"], "--jobs must be >= 1, got 0"),
        (["--jobs", "2", "--strategy", "ddp"], "--jobs 2 runs the methods in processes of its own, which --strategy ddp "
                                               "cannot run in: use --jobs 1 with a DDP strategy"),
        (["--mask_unseen_classes"], "--mask_unseen_classes needs --scenario class (one head over all classes), got --scenario domain"),
        (["--mask_unseen_classes", "--scenario", "task"], "--mask_unseen_classes needs --scenario class"),
        (["--distillation.alpha", "1-1/T"], "--distillation.alpha must be a number in [0, 1] or '1-1/t', got '1-1/T'"),
        (["--replay.offer", "twice"], "--replay.offer must be one of every_epoch, once, got 'twice'"),
    ],
)
def test_issue_18_options_are_checked_before_any_run(flags, says, tmp_path, capsys):
    with pytest.raises(UsageError, match=re.escape(says)):
        settings_of(*flags)
    assert main([*flags, "--output", str(tmp_path / "out")]) == 2  # the command: one line, status 2, nothing written
    assert says in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_seed_flag_replaces_the_other_from_a_config_file_and_one_file_may_not_give_both(tmp_path):
    seeds, seed, both = (tmp_path / f"{name}.yaml" for name in ("seeds", "seed", "both"))
    seeds.write_text("seeds: [0, 1]\n")
    seed.write_text("seed: 4\n")  # as a one-seed run's config.yaml holds it
    both.write_text("seed: 4\nseeds: [0, 1]\n")
    parser = build_parser()
    one = parse(parser, ["compare", "--config", str(seeds), "--seed", "2"])
    assert (one.seed, one.seeds) == (2, None)
    several = parse(parser, ["compare", "--config", str(seed), "--seeds", "1", "2"])
    assert (several.seed, several.seeds) == (None, [1, 2])
    with pytest.raises(UsageError, match=re.escape("--seed 4 and --seeds 0 1 both given")):
        parse(parser, ["compare", "--config", str(both)])
    with pytest.raises(UsageError, match=re.escape("--seed 3 and --seeds 1 both given")):
        parse(parser, ["compare", "--config", str(seed), "--seed", "3", "--seeds", "1"])


def test_the_new_options_parse_to_what_the_runs_take():
    settings = settings_of("--keep_optimizer_state", "--mask_unseen_classes", "--scenario", "class", "--jobs", "3",
                           "--distillation.alpha", "1-1/t", "--replay.offer", "once")
    assert (settings.keep_optimizer_state, settings.mask_unseen_classes, settings.jobs) == (True, True, 3)
    assert settings.distillation.alpha == "1-1/t" and settings.replay.offer == "once"
    assert settings_of("--distillation.alpha", "0.25").distillation.alpha == 0.25  # a number stays a number
    defaults = settings_of()
    assert (defaults.keep_optimizer_state, defaults.mask_unseen_classes, defaults.jobs) == (False, False, 1)
    assert (defaults.seed, defaults.seeds, defaults.replay.offer) == (None, None, "every_epoch")


def test_the_baselines_take_no_settings_and_are_in_the_default_methods():
    assert METHODS[:3] == ("none", "joint", "cumulative")
    assert not set(BASELINES) & set(METHOD_SETTINGS)
    assert settings_of().methods[:3] == ["none", "joint", "cumulative"]


def test_keep_on_device_parses_to_what_the_data_module_takes(tmp_path):
    assert settings_of().keep_on_device is False
    assert settings_of("--keep_on_device").keep_on_device is True
    assert settings_of("--keep_on_device", "--no_keep_on_device").keep_on_device is False
    config = tmp_path / "run.yaml"
    config.write_text("keep_on_device: true\n")  # as a run's config.yaml holds it
    assert settings_of("--config", str(config)).keep_on_device is True
