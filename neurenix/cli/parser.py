"""The options of ``neurenix compare``, their checks, and the checks of ``--config`` files.

jsonargparse reads the flags and the YAML files; it takes some wrong shapes of YAML without a
word (``ewc: 5`` replaces the method's settings by a number, ``seed: null`` a number by nothing)
and answers others with Python's own messages (``methods: ewc``: ``'str' object does not
support item assignment``). :func:`check_config_files` reads each file first and names the key
and what it expects; :func:`check_settings` checks what no source may give. Neither torch nor
Lightning is imported here.
"""

from __future__ import annotations

import difflib
import re
from argparse import ArgumentError, RawDescriptionHelpFormatter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import yaml
from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser, DefaultHelpFormatter, Namespace

from neurenix.cli.settings import ALPHA_SCHEDULE, METHOD_SETTINGS, METHODS, REPLAY_OFFERS, UsageError

__all__ = [
    "PROG", "SUBCOMMANDS", "build_parser", "check_config", "check_config_files", "check_settings", "one_line", "parse",
]

PROG = "neurenix"
#: The subcommands; a command line that starts with none of them runs the first.
SUBCOMMANDS = ("compare",)
#: The settings whose null means "not given" (--print_config prints them so): the seeds, of which
#: one may be given (--seed for one, --seeds for several; neither: seed 0).
_NOT_GIVEN = ("seed", "seeds")
#: Every source (digits, MNIST, Fashion-MNIST) has ten classes: a split has at most ten tasks.
SOURCE_CLASSES = 10

_DESCRIPTION = """\
Compare continual-learning methods on one task sequence, offline.

The first line printed names the benchmark, the data read (and the folder it was read
from), the scenario, the tasks and their classes, and the seeds. Each method in --methods
trains a fresh MLP (two hidden ReLU layers of --hidden units, Adam) on the tasks one after
the other, --epochs epochs each, from the same --seed. Besides the methods, --methods takes
three baselines: "none" (plain fine-tuning), "joint" (one fit on every task's data together,
--epochs epochs: the offline upper bound; it has no sequence, so no BWT or forgetting) and
"cumulative" (task t trained on the data of tasks 0..t). After every epoch every task's test
accuracy is measured and logged. At the end a table gives, per method: average accuracy over
all tasks after the last one, backward transfer (BWT: mean change of each earlier task's
accuracy since it was learned; negative means forgetting), forgetting (mean drop from each
earlier task's best accuracy) and wall time. Tasks are numbered from 0 everywhere (the
table's header, the plot, results.json, TensorBoard's accuracy/task_0, ...). Progress bars
are shown when the output is a terminal (and --jobs is 1); a redirected run prints the table
and the files written.

Seeds: --seeds 0 1 2 runs every method once per seed (a seed draws the class order or the
permutations, the initial weights and the batch order: each seed's run is the run --seed
would make). The table then gives each metric as mean ± standard deviation over the seeds
(the sample standard deviation, ddof=1) and the mean time of one run; results.json holds
every seed's run and the aggregates; the plot draws each task's mean curve with a band of
± one standard deviation. --jobs N runs N of the (method, seed) runs at once, each in a
process of its own (joblib's loky processes), with the same results as --jobs 1.

Written under --output, one run per folder: results.json (settings, accuracy matrices,
metrics), config.yaml (the settings, for --config), forgetting_curves.png, and
tensorboard/<method> (with several seeds tensorboard/<method>/seed_<s>; tensorboard
--logdir OUTPUT/tensorboard). A folder that already holds a run is refused; --overwrite
first removes the files a run writes there (and no others).

Scenarios (van de Ven & Tolias 2019): "task": the task id is given, one output head per
task; "domain": one head shared by all tasks, labels within the task (split: which of the
task's classes); "class": one head over all classes seen so far. Split benchmarks give
each task floor(10 / num_tasks) classes; permuted ones all ten classes under a pixel
permutation per task.

"neurenix [options]" is "neurenix compare [options]". Settings are read in order:
defaults, --config files, then flags (a later one wins). Lists: --methods ewc replay,
or "methods: [ewc, replay]" in YAML. Exit status: 0 done, 2 bad option, 1 run failed.

"neurenix reproduce hsu2018" runs the protocol of a published table (Hsu et al. 2018, Table 2)
and prints our numbers beside the paper's ("neurenix reproduce --help").
"""


class _HelpFormatter(DefaultHelpFormatter, RawDescriptionHelpFormatter):
    """jsonargparse's help (types, defaults, config options) with the description's paragraphs kept."""


def build_parser() -> ArgumentParser:
    """The ``neurenix`` parser: one subcommand, ``compare`` (its parser: ``parser.compare_parser``)."""
    parser = ArgumentParser(
        prog=PROG, description="Continual learning for PyTorch Lightning.", formatter_class=_HelpFormatter, exit_on_error=False
    )
    subcommands = parser.add_subcommands(required=True, dest="command")
    parser.compare_parser = _compare_parser()
    subcommands.add_subcommand("compare", parser.compare_parser, help="compare continual-learning methods (the default)")
    return parser


def _compare_parser() -> ArgumentParser:
    parser = ArgumentParser(
        description=_DESCRIPTION, usage=f"{PROG} [compare] [--config FILE] [options]",
        formatter_class=_HelpFormatter, exit_on_error=False,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file of settings (as --print_config writes)")
    data = parser.add_argument_group("Benchmark")
    data.add_argument("--benchmark", choices=["split", "permuted"], default="split",
                      help="split: each task its own classes; permuted: all classes, pixels permuted per task")
    data.add_argument("--dataset", choices=["digits", "mnist", "fashion_mnist"], default="digits",
                      help="digits: scikit-learn's 8x8 digits, offline; mnist/fashion_mnist: IDX files under --data_root")
    data.add_argument("--data_root", type=str, default="data",
                      help="folder with the MNIST/Fashion-MNIST IDX files (ROOT, ROOT/MNIST/raw or ROOT/FashionMNIST/raw)")
    data.add_argument("--download", action=ActionYesNo, default=False, help="download missing MNIST/Fashion-MNIST files into --data_root")
    data.add_argument("--scenario", choices=["task", "domain", "class"], default="domain",
                      help="task: task ids given, a head per task; domain: one shared head; class: one head over all classes")
    data.add_argument("--num_tasks", type=int, default=5, help="tasks in the sequence, at least 2 (split: at most 10)")
    train = parser.add_argument_group("Training")
    train.add_argument("--methods", nargs="+", type=str, default=list(METHODS),
                       help=f"methods to compare, in order, from: {', '.join(METHODS)} (none: plain fine-tuning)")
    train.add_argument("--epochs", type=int, default=4, help="training epochs per task")
    train.add_argument("--batch_size", type=int, default=32, help="training batch size")
    train.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate")
    train.add_argument("--hidden", type=int, default=128, help="units in each of the MLP's two hidden layers")
    train.add_argument("--seed", type=int, default=None,
                       help="seed of the class order, permutations, initialization and shuffling (0 when neither "
                            "--seed nor --seeds is given)")
    train.add_argument("--seeds", type=int, nargs="+", default=None,
                       help="several seeds: each method runs once per seed, the table gives mean ± std (not with "
                            "--seed; a flag of either replaces the other from a --config file)")
    train.add_argument("--keep_optimizer_state", action=ActionYesNo, default=False,
                       help="carry Adam's state (moments, step counts) from each task to the next; by default each "
                            "task starts a fresh optimizer, as Lightning does at every fit")
    train.add_argument("--mask_unseen_classes", action=ActionYesNo, default=False,
                       help="--scenario class only: the MLP's logits of classes not seen yet are masked out, in "
                            "training and prediction (the single head trains over the classes seen so far)")
    hardware = parser.add_argument_group("Hardware (Lightning Trainer arguments)")
    hardware.add_argument("--accelerator", type=str, default="auto", help="cpu, gpu, mps, auto, ...")
    hardware.add_argument("--devices", type=Union[int, list[int], str], default=1, help="a count, a list of ids, or auto")
    hardware.add_argument("--strategy", type=str, default="auto",
                          help="auto, ddp, ... (ddp runs every method on every device; strategies that start their "
                               "processes from this one, such as ddp_spawn and ddp_fork, are refused: use ddp)")
    hardware.add_argument("--keep_on_device", action=ActionYesNo, default=False,
                          help="keep every task's data on the training device (each DDP process on its own) and "
                               "build the batches there: no host-to-device copy per step; the data of all tasks must "
                               "fit in the device's memory (docs/device-data.md)")
    hardware.add_argument("--jobs", type=int, default=1,
                          help="runs (method x seed) at once, each in a process of its own (joblib's loky), with the "
                               "results of --jobs 1; not with a DDP strategy")
    hardware.add_argument("--threads", type=int, default=1,
                          help="PyTorch CPU threads per process; 0: PyTorch's default. One is fastest for these small MLPs "
                               "(more threads only add synchronisation, and thrash on a busy machine)")
    output = parser.add_argument_group("Output")
    output.add_argument("--output", type=str, default="neurenix-runs",
                        help="folder for results.json, config.yaml, the plot and the TensorBoard logs: one run per folder")
    output.add_argument("--overwrite", action=ActionYesNo, default=False,
                        help="if --output holds a run, remove that run's files (only those) before this one")
    for name, settings in METHOD_SETTINGS.items():
        parser.add_class_arguments(settings, name)
    return parser


# ---------------------------------------------------------------------------- settings
def check_settings(settings: Namespace) -> None:
    """Raise :class:`UsageError` for settings that no run could use."""
    _check_shapes(settings)
    _at_least("epochs", settings.epochs, 1)
    _at_least("batch_size", settings.batch_size, 1)
    _at_least("hidden", settings.hidden, 1)
    _at_least("num_tasks", settings.num_tasks, 2)  # with one task there is nothing to forget
    _at_least("threads", settings.threads, 0)
    _at_least("jobs", settings.jobs, 1)
    if settings.benchmark == "split" and settings.num_tasks > SOURCE_CLASSES:
        raise UsageError(f"--num_tasks must be at most {SOURCE_CLASSES} for a split benchmark (a class per task), got {settings.num_tasks}")
    _check_seeds(settings.seed, settings.seeds)
    if not settings.lr > 0:
        raise UsageError(f"--lr must be > 0, got {settings.lr}")
    _check_methods(list(settings.methods))
    _check_options(settings)


def _check_seeds(seed: Optional[int], seeds: Optional[list]) -> None:
    if seed is not None and seeds is not None:
        raise UsageError(f"--seed {seed} and --seeds {' '.join(map(str, seeds))} both given: give --seed for one seed, "
                         "or --seeds for several")
    for value in [seed] if seeds is None else seeds:
        if value is not None and not 0 <= value < 2**32:
            raise UsageError(f"--{'seed' if seeds is None else 'seeds'} must be in [0, 2**32), got {value}")
    if seeds is not None and len(set(seeds)) < len(seeds):
        repeated = sorted({value for value in seeds if seeds.count(value) > 1})
        raise UsageError(f"--seeds lists {', '.join(map(str, repeated))} more than once")


def _check_options(settings: Namespace) -> None:
    """The options that hold for some runs only, and the values a method's own check could not name."""
    if settings.jobs > 1 and "ddp" in str(settings.strategy).lower():
        raise UsageError(f"--jobs {settings.jobs} runs the methods in processes of its own, which --strategy "
                         f"{settings.strategy} cannot run in: use --jobs 1 with a DDP strategy")
    if settings.mask_unseen_classes and settings.scenario != "class":
        raise UsageError(f"--mask_unseen_classes needs --scenario class (one head over all classes), got --scenario "
                         f"{settings.scenario}")
    alpha = settings.distillation.alpha
    if isinstance(alpha, str) and alpha != ALPHA_SCHEDULE:
        raise UsageError(f"--distillation.alpha must be a number in [0, 1] or {ALPHA_SCHEDULE!r}, got {alpha!r}")
    if settings.replay.offer not in REPLAY_OFFERS:
        raise UsageError(f"--replay.offer must be one of {', '.join(REPLAY_OFFERS)}, got {settings.replay.offer!r}")


def _check_shapes(settings: Namespace) -> None:
    """Every method's settings a group of settings, every setting a value: what a YAML source can break."""
    for name, fields in METHOD_SETTINGS.items():
        section = settings.get(name)
        if not isinstance(section, Namespace):
            raise UsageError(f"--{name} must be a mapping of {name}'s settings ({_field_list(fields)}), got {_kind(section)}")
    for key, value in settings.items():
        # config: the files read, None when there were none; seed and seeds: None when not given
        if value is None and key not in ("config", *_NOT_GIVEN):
            raise UsageError(f"--{key} has no value (null); give one, or leave it out for its default")
    if not isinstance(settings.methods, list):
        raise UsageError(f"--methods must be a list of method names, got {_kind(settings.methods)}")


def _check_methods(methods: list) -> None:
    if not methods:
        raise UsageError("--methods needs at least one method")
    for name in methods:
        if name not in METHODS:
            raise UsageError(f"unknown method {name!r} in --methods; choose from {', '.join(METHODS)}")
    repeated = sorted({name for name in methods if methods.count(name) > 1})
    if repeated:
        raise UsageError(f"--methods lists {', '.join(repeated)} more than once")


def _at_least(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise UsageError(f"--{name} must be >= {minimum}, got {value}")


# ---------------------------------------------------------------------------- config files
def check_config_files(argv: Sequence[str], parser: ArgumentParser) -> None:
    """Check the shape of each ``--config`` of ``argv`` (the subcommand's arguments): a file, or inline YAML.

    A path that is not a file, and a file that is not YAML, are left to jsonargparse, whose
    messages name them.

    Raises:
        UsageError: naming the file, the key and what the key expects.
    """
    for value in _config_values(argv):
        path = Path(value)
        try:
            # PyYAML's own reading: jsonargparse's loader returns a one-key text such as "replay:" as
            # the string itself (it suits command-line values), where the file means replay: null.
            content = yaml.safe_load(path.read_text() if path.is_file() else value)
        except Exception:  # a YAML syntax error, an unreadable file: jsonargparse reports it
            continue
        if not path.is_file() and not isinstance(content, Mapping):
            continue  # a path to no file ("missing.yaml" loads as a string): jsonargparse says so
        try:
            check_config(content, parser)
        except UsageError as error:
            raise UsageError(f"--config {value}: {error}") from None


def _config_values(argv: Sequence[str]) -> list[str]:
    values = []
    for index, arg in enumerate(argv):
        if arg == "--config" and index + 1 < len(argv):
            values.append(argv[index + 1])
        elif arg.startswith("--config="):
            values.append(arg.split("=", 1)[1])
    return values


def check_config(content: Any, parser: ArgumentParser) -> None:
    """Check the shape of one config file's ``content`` (as YAML loads it) against ``parser``'s settings.

    Values of the right shape are left to the parser, whose messages name the type expected.

    Raises:
        UsageError: an empty file, a file that is not a mapping, an unknown key, a key without a
            value, ``methods`` that is not a list of names, a method's settings that are not a
            mapping of its own settings.
    """
    if content is None:
        raise UsageError('holds no settings; write one "key: value" a line (neurenix --print_config prints them all)')
    if not isinstance(content, Mapping):
        raise UsageError(f'must be a YAML mapping of settings, one "key: value" a line, got {_kind(content)}')
    known = _top_level_keys(parser)
    for key, value in content.items():
        if key not in known:
            raise UsageError(f"unknown setting {key!r}{_did_you_mean(key, known)}; neurenix --help lists them")
        if value is None and key not in _NOT_GIVEN:
            raise UsageError(f"{key} has no value (null); give one, or leave the key out for its default")
        if key == "methods":
            _check_method_list(value)
        elif key in METHOD_SETTINGS:
            _check_method_section(key, value)


def _top_level_keys(parser: ArgumentParser) -> set[str]:
    defaults = parser.get_defaults()
    return {key.split(".", 1)[0] for key in defaults.keys()} | {"config"}


def _check_method_list(value: Any) -> None:
    names = [name for name in value if isinstance(name, str)] if isinstance(value, list) else []
    if not isinstance(value, list) or len(names) < len(value):
        example = "[ewc, replay]" if not isinstance(value, str) else f"[{value}]"
        raise UsageError(f"methods must be a list of method names, such as methods: {example}; got {_kind(value)}")


def _check_method_section(name: str, value: Any) -> None:
    fields = METHOD_SETTINGS[name]
    if not isinstance(value, Mapping):
        raise UsageError(
            f"{name} must be a mapping of {name}'s settings ({_field_list(fields)}), such as "
            f"'{name}: {{{_field_names(fields)[0]}: ...}}'; got {_kind(value)}"
        )
    for key, setting in value.items():
        if key not in _field_names(fields):
            raise UsageError(f"{name} has no setting {key!r}{_did_you_mean(key, _field_names(fields))}; "
                             f"its settings: {_field_list(fields)}")
        if setting is None:
            raise UsageError(f"{name}.{key} has no value (null); give one, or leave the key out for its default")


def _field_names(settings: type) -> list[str]:
    return list(settings.__dataclass_fields__)


def _field_list(settings: type) -> str:
    return ", ".join(_field_names(settings))


def _did_you_mean(key: Any, known: Any) -> str:
    close = difflib.get_close_matches(str(key).replace("-", "_"), sorted(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _kind(value: Any) -> str:
    """What a YAML value is, for a message: ``the string 'ewc'``, ``the number 5``, ``a list: [1, 2]``."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"the boolean {value}"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, list):
        return f"a list: {_short(value)}"
    if isinstance(value, Mapping):
        return f"a mapping: {_short(dict(value))}"
    return f"{type(value).__name__}: {_short(value)}"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------- messages
def one_line(message: str) -> str:
    """jsonargparse's messages (``Parser key "epochs":\\n  Expected ...``) on one line, keys as flags."""
    message = re.sub(r'Parser key "([^"]+)":', r"--\1:", message)
    return re.sub(r"\s*\n\s*", " ", message).strip()


def parse(parser: ArgumentParser, argv: Sequence[str]) -> Namespace:
    """The subcommand's settings from ``argv`` (the subcommand first), checked.

    Raises:
        UsageError: a bad option, its message on one line.
        SystemExit: jsonargparse's, for --help and --print_config (they print, then exit).
    """
    check_config_files(argv[1:], parser.compare_parser)
    try:
        config = parser.parse_args(list(argv))
    except ArgumentError as error:
        raise UsageError(one_line(str(error))) from None
    settings = config[config.command]  # a Namespace; the method groups are nested Namespaces
    _flagged_seeds_win(settings, argv)
    check_settings(settings)
    return settings


def _flagged_seeds_win(settings: Namespace, argv: Sequence[str]) -> None:
    """A --seed (--seeds) flag replaces the --seeds (--seed) a --config file gave.

    A run's config.yaml holds its seed: ``--config run/config.yaml --seeds 0 1 2`` runs those
    seeds. Both flags on the command line, or both keys from the files, stay refused.
    """
    flags = {arg.split("=", 1)[0] for arg in argv}
    if "--seed" in flags and "--seeds" not in flags:
        settings.seeds = None
    elif "--seeds" in flags and "--seed" not in flags:
        settings.seed = None
