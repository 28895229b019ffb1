"""The ``neurenix`` command: a continual-learning comparison, offline, in one line.

``neurenix`` (or ``neurenix compare``, or ``python -m neurenix``) trains one small MLP per
method on the same task sequence from the same seed, plain fine-tuning (``none``) included, and
reports what each method kept: a table, ``results.json``, TensorBoard logs and a plot of the
forgetting curves. Every option can also come from a YAML file (``--config``); ``--print_config``
prints one. The parser is jsonargparse's; this module holds the options and their checks, the
settings they fill are in :mod:`neurenix.cli_settings`, the runs in :mod:`neurenix.cli_compare`
(imported only for a run: help and option errors need neither torch nor Lightning) and the
reports in :mod:`neurenix.cli_report`.

Exit codes: 0 success, 2 a bad option (one line on stderr, ``neurenix: error: ...``), 1 a
failure at run time that the options could not foresee (missing data, a failed download).
"""

from __future__ import annotations

import re
import sys
from argparse import ArgumentError, RawDescriptionHelpFormatter
from typing import Optional, Sequence, Union

from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser, DefaultHelpFormatter, Namespace

from neurenix.cli_settings import METHOD_SETTINGS, METHODS, CompareError, UsageError

__all__ = ["build_parser", "main"]

PROG = "neurenix"
#: The subcommands; a command line that starts with none of them runs the first.
SUBCOMMANDS = ("compare",)
#: Every source (digits, MNIST, Fashion-MNIST) has ten classes: a split has at most ten tasks.
SOURCE_CLASSES = 10

_DESCRIPTION = """\
Compare continual-learning methods on one task sequence, offline.

Each method in --methods (and "none", plain fine-tuning) trains a fresh MLP (two hidden
ReLU layers of --hidden units, Adam) on the tasks one after the other, --epochs epochs
each, from the same --seed. After every epoch every task's test accuracy is measured and
logged. At the end a table gives, per method: average accuracy over all tasks after the
last one, backward transfer (BWT: mean change of each earlier task's accuracy since it
was learned; negative means forgetting), forgetting (mean drop from each earlier task's
best accuracy) and wall time.

Written under --output: results.json (settings, accuracy matrices, metrics), config.yaml
(the settings, for --config), forgetting_curves.png, and tensorboard/<method>/version_N
(tensorboard --logdir OUTPUT/tensorboard).

Scenarios (van de Ven & Tolias 2019): "task": the task id is given, one output head per
task; "domain": one head shared by all tasks, labels within the task (split: which of the
task's classes); "class": one head over all classes seen so far. Split benchmarks give
each task floor(10 / num_tasks) classes; permuted ones all ten classes under a pixel
permutation per task.

"neurenix [options]" is "neurenix compare [options]". Settings are read in order:
defaults, --config files, then flags (a later one wins). Lists: --methods ewc replay,
or "methods: [ewc, replay]" in YAML. Exit status: 0 done, 2 bad option, 1 run failed.
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
    train.add_argument("--seed", type=int, default=0, help="seed of the class order, permutations, initialization and shuffling")
    hardware = parser.add_argument_group("Hardware (Lightning Trainer arguments)")
    hardware.add_argument("--accelerator", type=str, default="auto", help="cpu, gpu, mps, auto, ...")
    hardware.add_argument("--devices", type=Union[int, list[int], str], default=1, help="a count, a list of ids, or auto")
    hardware.add_argument("--strategy", type=str, default="auto", help="auto, ddp, ... (ddp runs every method on every device)")
    hardware.add_argument("--threads", type=int, default=1,
                          help="PyTorch CPU threads per process; 0: PyTorch's default. One is fastest for these small MLPs "
                               "(more threads only add synchronisation, and thrash on a busy machine)")
    parser.add_argument("--output", type=str, default="neurenix-runs", help="folder for results.json, the plot and the TensorBoard logs")
    for name, settings in METHOD_SETTINGS.items():
        parser.add_class_arguments(settings, name)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    Example::

        main(["--methods", "none", "ewc", "--epochs", "2", "--output", "runs"])
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        argv.insert(0, SUBCOMMANDS[0])
    parser = build_parser()
    try:
        try:
            config = parser.parse_args(argv)
        except SystemExit as done:  # --help and --print_config print and exit
            return 0 if done.code is None else int(done.code) if isinstance(done.code, int) else 1
        except ArgumentError as error:
            raise UsageError(_one_line(str(error))) from None
        settings = config[config.command]  # a Namespace; the method groups are nested Namespaces
        check_settings(settings)
        from neurenix.cli_compare import run_compare  # torch and Lightning: only for a run

        # config.yaml of the run: what --config reads back (the subcommand's settings, no `compare:` level)
        run_compare(settings, config_yaml=parser.compare_parser.dump(settings))
    except UsageError as error:
        return _fail(str(error), status=2)
    except CompareError as error:
        return _fail(str(error), status=1)
    return 0


def check_settings(settings: Namespace) -> None:
    """Raise :class:`UsageError` for settings that no run could use."""
    _at_least("epochs", settings.epochs, 1)
    _at_least("batch_size", settings.batch_size, 1)
    _at_least("hidden", settings.hidden, 1)
    _at_least("num_tasks", settings.num_tasks, 2)  # with one task there is nothing to forget
    _at_least("threads", settings.threads, 0)
    if settings.benchmark == "split" and settings.num_tasks > SOURCE_CLASSES:
        raise UsageError(f"--num_tasks must be at most {SOURCE_CLASSES} for a split benchmark (a class per task), got {settings.num_tasks}")
    if not 0 <= settings.seed < 2**32:
        raise UsageError(f"--seed must be in [0, 2**32), got {settings.seed}")
    if not settings.lr > 0:
        raise UsageError(f"--lr must be > 0, got {settings.lr}")
    methods = list(settings.methods)
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


def _one_line(message: str) -> str:
    """jsonargparse's messages (``Parser key "epochs":\\n  Expected ...``) on one line, keys as flags."""
    message = re.sub(r'Parser key "([^"]+)":', r"--\1:", message)
    return re.sub(r"\s*\n\s*", " ", message).strip()


def _fail(message: str, *, status: int) -> int:
    print(f"{PROG}: error: {_one_line(message)}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
