"""``neurenix reproduce hsu2018``: a published protocol, run, and our numbers set beside the paper's.

Hsu, Liu, Ramasamy & Kira 2018, "Re-evaluating Continual Learning Scenarios: A Categorization and
Case for Strong Baselines" (arXiv:1810.12488), Table 2: split MNIST (five tasks of two digits,
0-1, 2-3, ..., 8-9) in the three scenarios (incremental task, domain and class learning), an MLP
of two hidden layers of 400 units, Adam at 1e-3, batches of 128, 4 epochs per task, the mean ±
standard deviation of the final average accuracy over 10 runs. The protocol's settings come from
the authors' code (the GT-RIPL Continual-Learning-Benchmark repository: ``iBatchLearn.py``,
``agents/``, ``scripts/split_MNIST_incremental_*.sh``); :data:`HSU2018` holds each of them, the
authors' value, ours, and the reason for the mapping (their EWC and L2 penalties carry no ½, ours
do, so our importance is twice their coefficient; SI's has no ½ in either; ...). The docs page
"Reproducing published results" prints the same table (:func:`mapping_table`).

Each run is one ``neurenix compare`` run, its settings built by the compare parser from explicit
flags (:func:`run_flags`), so every option of the command reaches the runs; the benchmark is the
protocol's (fixed class order), built here. This module imports neither torch nor Lightning until
a run (:func:`run_reproduce`), so ``--help`` and option errors answer at once.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from argparse import ArgumentError
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from jsonargparse import ActionYesNo, ArgumentParser, Namespace

from neurenix.cli.output import remove_run
from neurenix.cli.parser import PROG, build_parser, one_line, parse
from neurenix.cli.settings import CompareError, UsageError

__all__ = [
    "HSU2018", "PROTOCOLS", "REPRODUCE_FILES", "Protocol", "Reported", "Reproduction", "ScenarioResult", "Setting",
    "check_reproduce", "compare_flags", "draw_reproduction", "mapping_table", "parse_reproduce", "reproduce_command",
    "reproduce_parser", "result_tables", "run_flags", "run_reproduce",
]

SCENARIOS = ("task", "domain", "class")
#: The scenarios as Table 2 names them.
SCENARIO_TITLES = {"task": "incremental task", "domain": "incremental domain", "class": "incremental class"}
#: What the command writes at the top of --output (the runs' logs go to --output/runs/<scenario>/seed_<s>).
REPRODUCE_FILES = ("results.json", "table.md", "reproduce.png")
RUNS = "runs"
DATASETS = ("mnist", "fashion_mnist")


# ---------------------------------------------------------------------------- the protocol
@dataclass(frozen=True)
class Setting:
    """One setting of a protocol: the authors' value, ours, and why ours is what it is.

    Attributes:
        methods: the methods it is for (``()``: every run).
        flag: our ``neurenix compare`` option, without the dashes (``ewc.importance``).
        authors: where the authors' code sets it.
        reference: the authors' values in the task, domain and class scenarios.
        ours: our values in the same order (``True``/``False`` for a yes/no option).
        reason: why ours follows from theirs.
        flagged: whether the value is given to the runs (``False``: a row that documents only).
    """

    methods: tuple[str, ...]
    flag: str
    authors: str
    reference: tuple[Any, Any, Any]
    ours: tuple[Any, Any, Any]
    reason: str
    flagged: bool = True

    def value(self, scenario: str) -> Any:
        return self.ours[SCENARIOS.index(scenario)]


@dataclass(frozen=True)
class Reported:
    """A number the paper reports: mean (and standard deviation, when a source we read has it), in percent."""

    mean: float
    std: Optional[float]
    source: str


@dataclass(frozen=True)
class Protocol:
    """A published table's protocol: the runs' settings, the paper's rows and numbers.

    Attributes:
        name: the command's spelling (``hsu2018``).
        title: the paper, for the output.
        dataset: the dataset the paper reports (its numbers are compared only on it).
        epochs: epochs per task.
        settings: every setting, with the authors' value and the reason for ours.
        rows: our method -> the paper's row, in the order of the output.
        reported: our method -> scenario -> the paper's number (absent: not found).
        sources: the key of each :class:`Reported` -> where its number was read.
        notes: what the output says under the tables when it compares: the paper's column, then ours.
        method_notes: a method's note, said when the method ran and the output compares.
    """

    name: str
    title: str
    dataset: str
    epochs: int
    settings: tuple[Setting, ...]
    rows: dict[str, str]
    reported: dict[str, dict[str, Reported]]
    sources: dict[str, str]
    notes: tuple[str, str]
    method_notes: dict[str, str] = field(default_factory=dict)


def _same(value: Any) -> tuple[Any, Any, Any]:
    return (value, value, value)


_EWC_HALF = ("Theirs adds reg_coef·Σ_t F_t·(θ − θ*_t)², no ½ (agents/regularization.py, L2.criterion); ours "
             "importance/2·Σ_t F_t·(θ − θ*_t)²: importance = 2·reg_coef.")
_FISHER_LABELS = ("Their Fisher takes the gradient at the model's most likely class (pred.max(1), empFI False), over "
                  "the seen classes' logits in the class scenario: our 'predicted' (our mask is inside the model).")
_FISHER_SAMPLES = ("EWC_mnist and EWC_online_mnist set n_fisher_sample = 60000: per-sample gradients (batches of 1) "
                   "over min(60000, task size), i.e. every training sample of the task, F their squares' mean. Ours "
                   "takes all of a task's samples when the size is larger, and the same mean.")

_HSU2018_SETTINGS = (
    # ------------------------------------------------------------ every run
    Setting((), "epochs", "--schedule 4", _same(4), _same(4),
            "4 epochs per task. Their MultiStepLR milestone is the last epoch (4), never reached: the learning rate "
            "stays 1e-3 all run long, as ours."),
    Setting((), "batch_size", "--batch_size 128", _same(128), _same(128), "The same."),
    Setting((), "lr", "--optimizer Adam --lr 0.001", _same(0.001), _same(0.001),
            "Adam, PyTorch's other defaults (no weight decay: their --weight_decay 0) in both."),
    Setting((), "hidden", "--model_name MLP400", _same(400), _same(400),
            "Two hidden ReLU layers of 400 units and a linear head (one per task in the task scenario, 2 units "
            "each; one of 2 units in the domain scenario, --force_out_dim 2; one of 10 in the class scenario, "
            "--force_out_dim 10 --no_class_remap). Their MLP reads MNIST padded to 32×32 and normalised (mean 0.1, "
            "std 0.2752); ours the 28×28 images scaled to [0, 1], which the command has no option to change."),
    Setting((), "keep_optimizer_state", "NormalNN.reset_optimizer = False", _same(True), _same(True),
            "Their agents build one optimizer and keep it, Adam's moments and step counts included, for the whole "
            "sequence: no agent of Table 2 sets reset_optimizer."),
    Setting((), "mask_unseen_classes", "valid_out_dim (add_valid_output_dim, --incremental_class)",
            ("no", "no", "seen classes"), (False, False, True),
            "Class scenario: their loss, EWC's Fisher labels and MAS's importance read the logits of the classes "
            "seen so far only (preds[:, :valid_out_dim]); our SeenClassMask does the same inside the model. They "
            "predict over all 10 units, we over the seen ones: after the last task every class is seen, so Table "
            "2's final average accuracy is the same measure."),
    # ------------------------------------------------------------ EWC, online EWC
    Setting(("ewc",), "ewc.importance", "--reg_coef (EWC_mnist)", (100, 100, 600), (200, 200, 1200),
            _EWC_HALF + " One penalty per task in both (online_reg False)."),
    Setting(("ewc",), "ewc.fisher", "label = argmax of the logits", _same("max"), _same("predicted"), _FISHER_LABELS),
    Setting(("ewc",), "ewc.fisher_sample_size", "n_fisher_sample", _same(60000), _same(60000), _FISHER_SAMPLES),
    Setting(("online_ewc",), "online_ewc.importance", "--reg_coef (EWC_online_mnist)", (400, 700, 100),
            (800, 1400, 200), _EWC_HALF + " One running Fisher and the last task's anchor in both (online_reg True)."),
    Setting(("online_ewc",), "online_ewc.gamma", "online_reg = True", _same("F += F_t"), _same(1.0),
            "Their running Fisher adds each task's Fisher with no decay (the importance is updated in place): γ = 1."),
    Setting(("online_ewc",), "online_ewc.fisher", "label = argmax of the logits", _same("max"), _same("predicted"),
            _FISHER_LABELS),
    Setting(("online_ewc",), "online_ewc.fisher_sample_size", "n_fisher_sample", _same(60000), _same(60000),
            _FISHER_SAMPLES),
    # ------------------------------------------------------------ SI
    Setting(("si",), "si.importance", "--reg_coef", (300, 3000, 600), (300, 3000, 600),
            "c·Σ Ω·(θ − θ*)² with no ½ in both, θ* the last task's parameters, Ω summed over tasks, ω from the "
            "unregularised loss's gradient times each step's change. Ours clips each task's Ω at 0 (relu), theirs "
            "does not."),
    Setting(("si",), "si.xi", "damping_factor", _same(0.1), _same(0.1), "ξ of Ω = ω / ((Δθ)² + ξ): the same."),
    # ------------------------------------------------------------ L2
    Setting(("l2",), "l2.importance", "--reg_coef", (0.01, 0.5, 100), (0.02, 1.0, 200),
            "Theirs reg_coef·Σ (θ − θ*)², θ* the last task's parameters (online_reg True), no ½; ours "
            "importance/2·Σ (θ − θ*)²: importance = 2·reg_coef."),
    # ------------------------------------------------------------ MAS
    Setting(("mas",), "mas.importance", "--reg_coef", (1, 10000, 1), (0.5, 5000, 0.5),
            "The penalties agree (λ·Σ Ω·(θ − θ*)², no ½, Ω summed over tasks), Ω does not: theirs is "
            "|∂ mean(f²)/∂θ| over a batch of 128 and its output units, averaged over the batches; ours the mean "
            "over samples of |∂‖f(x)‖²/∂θ|. Their mean over the K units divides by K = 2 in the task and domain "
            "scenarios, so λ = reg_coef/2; in the class scenario K is the number of seen units (2, 4, ..., 10), "
            "and the absolute value of a batch's mean is at most the mean of the absolute values: theirs is the "
            "smaller by a factor that depends on the data, which this mapping (K = 2) does not follow."),
    Setting(("mas",), "mas.sample_size", "every batch of the task's training loader", _same("all"), _same(60000),
            "Every training sample of the task (ours takes the task's size when the size is larger)."),
    # ------------------------------------------------------------ LwF
    Setting(("distillation",), "distillation.alpha", "none in their code (van de Ven & Tolias: rnt = 1/task)",
            _same("1-1/t"), _same("1-1/t"),
            "The GT-RIPL code has no LwF agent, so Table 2's LwF row is not from it. We weigh as the continual-"
            "learning code of van de Ven & Tolias does, loss = (1/t)·L_new + (1 − 1/t)·L_distill at the t-th task, "
            "our (1 − α)·L + α·T²·KL with α = 1 − 1/t (T² in both)."),
    Setting(("distillation",), "distillation.temperature", "KD_temp (van de Ven & Tolias)", _same(2.0), _same(2.0),
            "The distillation temperature of that code. In the class scenario ours distils the seen classes' units "
            "only, in the task scenario each learned task's head."),
    # ------------------------------------------------------------ naive rehearsal
    Setting(("replay",), "replay.memory_size", "Naive_Rehearsal_1100", _same(1100), _same(1100),
            "Table 2's naive rehearsal row has the static memory of online EWC: 1,100 images."),
    Setting(("replay",), "replay.offer", "memory_size // tasks random samples of each task, at its end",
            _same("per task"), _same("once"),
            "Theirs keeps an equal random share of each finished task. A reservoir offered each sample once keeps "
            "every sample of the stream with the same probability, so each task's share is equal in expectation "
            "(not exactly, and ours fills during the task)."),
    Setting(("replay",), "replay.replay_ratio", "memory repeated len(task) // memory_size times", _same("1:1"),
            _same(1.0),
            "Theirs shuffles the memory, repeated to about the task's size, into the task's data (old : new = 1 : "
            "1); ours appends replay_ratio × the batch's new samples drawn from memory to each batch."),
    Setting(("replay",), "batch_size", "--batch_size 128 (about half of it replayed)", _same(128), _same(64),
            "64 new + 64 replayed samples a step is their mixed batch of 128 and their steps per epoch (about "
            "N/64 for N new samples). Their first task, with no memory, takes N/128 steps of 128, ours N/64 of 64."),
    # ------------------------------------------------------------ GEM
    Setting(("gem",), "gem.memory_size", "GEM_1100", _same(1100), _same(1100),
            "The static memory of online EWC, an equal share per finished task in both."),
    Setting(("gem",), "gem.margin", "--reg_coef", _same(0.5), _same(0.5), "The quadratic program's margin."),
    Setting(("gem",), "lr", "--optimizer SGD --lr 0.01", _same("SGD 0.01"), _same("Adam 0.001"),
            "NOT the protocol: the authors train GEM with SGD at 0.01, the command every method with Adam. The GEM "
            "row compares two optimizers.", flagged=False),
)

_ROWS_QUOTED = "rows"
_CLASS_COLUMN = "class column"

HSU2018 = Protocol(
    name="hsu2018",
    title="Hsu, Liu, Ramasamy & Kira 2018, Re-evaluating Continual Learning Scenarios (arXiv:1810.12488), Table 2",
    dataset="MNIST",
    epochs=4,
    settings=_HSU2018_SETTINGS,
    rows={
        "none": "Adam", "joint": "Offline", "ewc": "EWC", "online_ewc": "Online EWC", "si": "SI", "l2": "L2",
        "mas": "MAS", "distillation": "LwF", "replay": "Naive rehearsal", "gem": "GEM",
    },
    reported={
        "replay": {"task": Reported(99.40, 0.08, _ROWS_QUOTED), "domain": Reported(95.16, 0.49, _ROWS_QUOTED),
                   "class": Reported(90.78, 0.85, _ROWS_QUOTED)},
        "gem": {"task": Reported(98.42, 0.10, _ROWS_QUOTED), "domain": Reported(96.16, 0.35, _ROWS_QUOTED),
                "class": Reported(92.20, 0.12, _ROWS_QUOTED)},
        "joint": {"class": Reported(97.53, None, _CLASS_COLUMN)},
        "ewc": {"class": Reported(19.80, None, _CLASS_COLUMN)},
        "online_ewc": {"class": Reported(19.77, None, _CLASS_COLUMN)},
        "si": {"class": Reported(19.67, None, _CLASS_COLUMN)},
        "l2": {"class": Reported(22.52, None, _CLASS_COLUMN)},
        "mas": {"class": Reported(19.52, None, _CLASS_COLUMN)},
        "distillation": {"class": Reported(24.17, None, _CLASS_COLUMN)},
    },
    sources={
        _ROWS_QUOTED: "the naive rehearsal and GEM rows of Table 2 (v4) as quoted word for word, mean ± std of 10 "
                      "runs, columns incremental task, domain, class",
        _CLASS_COLUMN: "the incremental class column of Table 2 (v4) as transcribed from the arXiv HTML text, means "
                       "only",
    },
    notes=(
        ("paper: Table 2's mean ± std of 10 runs, in %; a mean without ± was found without its std; — : not found "
         "in any source we could read (left out, not guessed)."),
        "ours: mean ± std over --seeds, std as the authors' iBatchLearn.py prints it (numpy's, ddof=0).",
    ),
    method_notes={
        "gem": "gem: the authors train GEM with SGD at lr 0.01; the command trains every method with Adam at 1e-3.",
    },
)

#: The protocols ``neurenix reproduce`` knows.
PROTOCOLS: dict[str, Protocol] = {HSU2018.name: HSU2018}


def run_flags(protocol: Protocol, method: str, scenario: str) -> dict[str, Any]:
    """The compare options of ``method``'s run in ``scenario``: flag (no dashes) -> value, later rows overriding."""
    flags: dict[str, Any] = {}
    for setting in protocol.settings:
        if setting.flagged and (not setting.methods or method in setting.methods):
            flags[setting.flag] = setting.value(scenario)
    return flags


def _argv(flags: dict[str, Any]) -> list[str]:
    argv = []
    for flag, value in flags.items():
        if isinstance(value, bool):
            argv.append(f"--{flag}" if value else f"--no_{flag}")
        else:
            argv += [f"--{flag}", str(value)]
    return argv


# ---------------------------------------------------------------------------- the mapping table (docs)
def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _per_scenario(values: tuple[Any, Any, Any]) -> str:
    shown = [_shown(value) for value in values]
    return shown[0] if len(set(shown)) == 1 else " / ".join(shown)


def mapping_table(protocol: Protocol) -> str:
    """The protocol's settings as a Markdown table: method, option, the authors' value, ours, why.

    Values that differ between the scenarios are given as ``task / domain / class``.
    """
    lines = [
        "| method | our option | the authors' code | theirs | ours | why |",
        "|---|---|---|---|---|---|",
    ]
    for setting in protocol.settings:
        methods = ", ".join(setting.methods) or "every run"
        option = f"--{setting.flag}" + ("" if setting.flagged else " (not set)")
        lines.append(
            f"| {methods} | `{option}` | {setting.authors} | {_per_scenario(setting.reference)} | "
            f"{_per_scenario(setting.ours)} | {setting.reason} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the command line
_DESCRIPTION = """\
Run a published continual-learning table's protocol and set our numbers beside the paper's.

hsu2018: Hsu et al. 2018, "Re-evaluating Continual Learning Scenarios" (arXiv:1810.12488),
Table 2: split MNIST (5 tasks of 2 digits, 0-1, 2-3, ..., 8-9, in that order) in the
incremental task, domain and class scenarios; an MLP of two hidden layers of 400 units, Adam
at 1e-3, batches of 128, 4 epochs per task, Adam's state kept across tasks, the class
scenario trained over the classes seen so far; the baselines "none" (fine-tuning, Table 2's
Adam row) and "joint" (Offline), and every method we have that the table has, with the
authors' coefficients mapped to our conventions (docs: "Reproducing published results").

Per scenario a table gives, per method, our final average accuracy (mean ± std over the
seeds, %) and the paper's. On a dataset other than MNIST there is nothing to compare: the
paper reports MNIST only, and the output says so. Written under --output: results.json
(settings, every seed's run, the aggregates, the paper's numbers), table.md, reproduce.png
(bars with error bars per scenario, ours beside the paper's) and runs/<scenario>/seed_<s>
(TensorBoard logs). Exit status: 0 done, 2 bad option, 1 run failed.
"""


def reproduce_parser() -> ArgumentParser:
    """The parser of ``neurenix reproduce``: a protocol name and the options of its runs."""
    parser = ArgumentParser(
        prog=f"{PROG} reproduce", description=_DESCRIPTION, exit_on_error=False,
        usage=f"{PROG} reproduce PROTOCOL [options]",
    )
    parser.add_argument("protocol", type=str, help=f"the published table to reproduce: {', '.join(PROTOCOLS)}")
    parser.add_argument("--root", type=str, default="data",
                        help="folder with the dataset's IDX files (ROOT, ROOT/MNIST/raw or ROOT/FashionMNIST/raw)")
    parser.add_argument("--download", action=ActionYesNo, default=False,
                        help="download missing MNIST/Fashion-MNIST files into --root")
    parser.add_argument("--dataset", type=str, default="mnist",
                        help="mnist (the paper's) or fashion_mnist (no paper numbers to compare with)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)),
                        help="seeds of the runs (initial weights, batch order); the paper averages 10 runs")
    parser.add_argument("--scenarios", type=str, nargs="+", default=list(SCENARIOS),
                        help="task, domain and/or class (Table 2's incremental task, domain, class learning)")
    parser.add_argument("--methods", type=str, nargs="+", default=None,
                        help="methods and baselines to run, from the protocol's (default: all of them)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per task (default: the protocol's)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, each in a process of its own")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch CPU threads per run (0: PyTorch's default)")
    parser.add_argument("--output", type=str, default="neurenix-reproduce",
                        help="folder for results.json, table.md, reproduce.png and the runs' logs")
    parser.add_argument("--overwrite", action=ActionYesNo, default=False,
                        help="if --output holds an earlier reproduction, remove its files (only those) first")
    return parser


def parse_reproduce(argv: Sequence[str]) -> Namespace:
    """The checked settings of ``neurenix reproduce`` from ``argv`` (the arguments after ``reproduce``).

    Raises:
        UsageError: a bad option, on one line.
        SystemExit: jsonargparse's, for --help.
    """
    try:
        settings = reproduce_parser().parse_args(list(argv))
    except ArgumentError as error:
        raise UsageError(one_line(str(error))) from None
    check_reproduce(settings)
    return settings


def check_reproduce(settings: Namespace) -> None:
    """Raise :class:`UsageError` for settings no reproduction could use, naming the option and the value."""
    if settings.protocol not in PROTOCOLS:
        raise UsageError(f"unknown protocol {settings.protocol!r}; choose from {', '.join(PROTOCOLS)}")
    protocol = PROTOCOLS[settings.protocol]
    if settings.dataset not in DATASETS:
        raise UsageError(f"--dataset must be one of {', '.join(DATASETS)}, got {settings.dataset!r}")
    _check_names("--scenarios", settings.scenarios, SCENARIOS)
    if settings.methods is not None:
        _check_names("--methods", settings.methods, tuple(protocol.rows))
    if len(set(settings.seeds)) < len(settings.seeds):
        raise UsageError(f"--seeds lists a seed more than once: {' '.join(map(str, settings.seeds))}")
    for seed in settings.seeds:
        if not 0 <= seed < 2**32:
            raise UsageError(f"--seeds must be in [0, 2**32), got {seed}")
    for name, minimum in (("epochs", 1), ("jobs", 1), ("threads", 0)):
        value = getattr(settings, name)
        if value is not None and value < minimum:
            raise UsageError(f"--{name} must be >= {minimum}, got {value}")


def _check_names(option: str, names: list[str], known: tuple[str, ...]) -> None:
    for name in names:
        if name not in known:
            raise UsageError(f"unknown name {name!r} in {option}; choose from {', '.join(known)}")
    if len(set(names)) < len(names):
        raise UsageError(f"{option} lists a name more than once: {' '.join(names)}")


def reproduce_command(argv: Sequence[str]) -> int:
    """``neurenix reproduce ARGV``: parse, run, report; returns the exit status (0, 2 bad option, 1 failure)."""
    try:
        try:
            settings = parse_reproduce(argv)
        except SystemExit as done:  # --help prints, then exits
            return 0 if done.code is None else int(done.code) if isinstance(done.code, int) else 1
        run_reproduce(settings)
    except UsageError as error:
        return _fail(str(error), status=2)
    except CompareError as error:
        return _fail(str(error), status=1)
    return 0


def _fail(message: str, *, status: int) -> int:
    print(f"{PROG}: error: {one_line(message)}", file=sys.stderr)
    return status


# ---------------------------------------------------------------------------- the runs
@dataclass
class ScenarioResult:
    """One method in one scenario: what it ran with, what each seed gave, and the paper's number.

    Attributes:
        method: our method (or baseline).
        row: the paper's row.
        flags: the compare options of its runs (the seed aside).
        hyperparameters: its method's hyper-parameters, as the first seed's run built them.
        per_seed: seed -> final average accuracy, in %.
        matrices: seed -> accuracy matrix ``[after task i][on task j]`` (``None`` for NaN).
        paper: the paper's number, ``None`` where none was found.
    """

    method: str
    row: str
    flags: dict[str, Any]
    hyperparameters: dict[str, Any]
    per_seed: dict[int, float]
    matrices: dict[int, list]
    paper: Optional[Reported]

    @property
    def mean(self) -> float:
        values = list(self.per_seed.values())
        return sum(values) / len(values)

    @property
    def std(self) -> float:
        """numpy's default standard deviation (ddof=0), as the authors' iBatchLearn.py prints it."""
        values = list(self.per_seed.values())
        return math.sqrt(sum((value - self.mean) ** 2 for value in values) / len(values))


@dataclass
class Reproduction:
    """Everything a reproduction found, per scenario in the order run."""

    protocol: Protocol
    dataset: str
    data: str
    seeds: list[int]
    epochs: int
    results: dict[str, list[ScenarioResult]] = field(default_factory=dict)

    @property
    def compares(self) -> bool:
        """Whether the paper's numbers are about this data (the paper reports one dataset)."""
        return self.data == self.protocol.dataset


def run_reproduce(settings: Namespace) -> Reproduction:
    """Run the protocol of ``settings`` (from :func:`parse_reproduce`); print the tables, write the files.

    Every run's settings are built (and checked by the compare parser) and the data read before
    anything is removed or trained.

    Raises:
        UsageError: a setting the compare parser refuses.
        CompareError: the data is missing or unreadable, or a run failed.
    """
    check_reproduce(settings)
    protocol = PROTOCOLS[settings.protocol]
    output = Path(settings.output)
    _check_output(output, settings.overwrite)
    methods = list(settings.methods or protocol.rows)
    epochs = settings.epochs or protocol.epochs
    from neurenix.cli.runs import run_many  # torch and Lightning: only for a run

    benchmarks, data = _benchmarks(settings, settings.scenarios)
    flags = {(scenario, method): compare_flags(settings, protocol, method, scenario, settings.seeds[0], epochs)
             for scenario in settings.scenarios for method in methods}
    runs = _run_settings(flags, settings.seeds)
    reproduction = Reproduction(protocol, settings.dataset, data.name, list(settings.seeds), epochs)
    _remove_earlier(output, settings.overwrite)
    for warning in data.warnings:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    print(_describe(reproduction, data), flush=True)
    keys = list(runs)
    calls = [(method, runs[scenario, method, seed], benchmarks[scenario], output / RUNS / scenario / f"seed_{seed}")
             for scenario, method, seed in keys]
    done = run_many(calls, settings.jobs, progress=False, done=_progress_line(keys))
    for scenario in settings.scenarios:
        reproduction.results[scenario] = [
            _result(protocol, method, scenario, flags[scenario, method],
                    {key[2]: run for key, run in zip(keys, done) if key[:2] == (scenario, method)})
            for method in methods
        ]
    print()
    print(result_tables(reproduction))
    for label, path in _write(reproduction, output).items():
        print(f"{label:<8} {path}")
    return reproduction


def compare_flags(
    settings: Namespace, protocol: Protocol, method: str, scenario: str, seed: int, epochs: int
) -> dict[str, Any]:
    """Every ``neurenix compare`` option of one run (flag without dashes -> value), for the compare parser."""
    return {
        "benchmark": "split", "dataset": settings.dataset, "data_root": settings.root, "download": settings.download,
        "scenario": scenario,
        "num_tasks": 5, "methods": method, "seed": seed, "threads": settings.threads,
        **run_flags(protocol, method, scenario), "epochs": epochs,
    }


def _run_settings(flags: dict[tuple[str, str], dict[str, Any]], seeds: list[int]) -> dict[tuple[str, str, int], Namespace]:
    """Each run's settings: the compare parser's from the flags with the first seed; a copy per other seed.

    Parsing takes a run's settings through every check of ``neurenix compare``; the other seeds'
    copies differ in ``seed`` only (checked by :func:`check_reproduce`), which spares the
    hundreds of parses of a full reproduction.
    """
    parser = build_parser()
    runs = {}
    for (scenario, method), options in flags.items():
        first = parse(parser, ["compare", *_argv(options)])
        for seed in seeds:
            runs[scenario, method, seed] = first.clone()
            runs[scenario, method, seed].seed = seed
    return runs


def _benchmarks(settings: Namespace, scenarios: list[str]) -> tuple[dict[str, Any], Any]:
    """The protocol's task sequence per scenario (classes 0..9 in order, two a task) and the data read."""
    from neurenix.cli.runs import read_source
    from neurenix.data import split_benchmark

    try:
        source, data = read_source(Namespace(dataset=settings.dataset, data_root=settings.root, download=settings.download))
    except CompareError as error:  # the compare command's words, with this command's option
        raise CompareError(_our_option(str(error))) from None
    data.warnings = [_our_option(warning) for warning in data.warnings]
    benchmarks = {
        scenario: split_benchmark(source, num_tasks=5, classes_per_task=2, class_order=list(range(10)), scenario=scenario)
        for scenario in scenarios
    }
    return benchmarks, data


def _our_option(message: str) -> str:
    return message.replace("--data_root", "--root")


def _progress_line(keys: list[tuple[str, str, int]]) -> Any:
    position = iter(keys)

    def line(run: Any) -> None:
        scenario, method, seed = next(position)
        print(f"{scenario:<7} {method:<13} seed {seed:<4} average accuracy {100 * run.average_accuracy:6.2f}%  "
              f"({run.wall_time:.1f}s)", flush=True)

    return line


def _result(protocol: Protocol, method: str, scenario: str, flags: dict[str, Any], runs: dict[int, Any]) -> ScenarioResult:
    first = next(iter(runs.values()))
    return ScenarioResult(
        method, protocol.rows[method], {key: value for key, value in flags.items() if key != "seed"},
        first.hyperparameters,
        {seed: 100 * run.average_accuracy for seed, run in runs.items()},
        {seed: _plain(run.matrix.tolist()) for seed, run in runs.items()},
        protocol.reported.get(method, {}).get(scenario),
    )


def _plain(values: Any) -> Any:
    """Lists of floats for JSON, NaN (a joint run's untrained rows) as None."""
    if isinstance(values, list):
        return [_plain(value) for value in values]
    return None if math.isnan(values) else values


def _describe(reproduction: Reproduction, data: Any) -> str:
    folder = f" from {data.folder}" if data.folder is not None else ""
    seeds = " ".join(map(str, reproduction.seeds))
    return (f"{reproduction.protocol.title}: split {data.name}{folder}, tasks 0-4 (classes 0,1 | 2,3 | 4,5 | 6,7 | "
            f"8,9), {reproduction.epochs} epochs per task, seeds {seeds}")


# ---------------------------------------------------------------------------- the tables
def _cell(mean: Optional[float], std: Optional[float]) -> str:
    if mean is None:
        return "—"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def _no_comparison(reproduction: Reproduction) -> str:
    return (f"The paper reports {reproduction.protocol.dataset} only: there is nothing to compare this "
            f"{reproduction.data} run with.")


def result_tables(reproduction: Reproduction, markdown: bool = False) -> str:
    """Per scenario: method | ours mean ± std | paper mean ± std; without the paper's column off its dataset."""
    blocks = []
    for scenario, results in reproduction.results.items():
        header = ["method", "Table 2 row", "ours (%)"] + (["paper (%)"] if reproduction.compares else [])
        rows = []
        for result in results:
            row = [result.method, result.row, _cell(result.mean, result.std)]
            if reproduction.compares:
                row.append(_cell(*((result.paper.mean, result.paper.std) if result.paper else (None, None))))
            rows.append(row)
        title = f"split {reproduction.data}, {SCENARIO_TITLES[scenario]} ({scenario}-incremental)"
        blocks.append(_markdown(title, header, rows) if markdown else _text(title, header, rows))
    protocol = reproduction.protocol
    if reproduction.compares:
        ran = {result.method for results in reproduction.results.values() for result in results}
        notes = [*protocol.notes, *(note for method, note in protocol.method_notes.items() if method in ran)]
    else:
        notes = [_no_comparison(reproduction), protocol.notes[1]]
    return "\n\n".join(blocks + ["\n".join(notes)])


def _text(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(line[column]) for line in [header, *rows]) for column in range(len(header))]
    lines = [title]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [header, *rows]]
    return "\n".join(lines)


def _markdown(title: str, header: list[str], rows: list[list[str]]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the files
def results_document(reproduction: Reproduction) -> dict[str, Any]:
    """``results.json``: the protocol, the data, per scenario and method the flags, every seed's result, the paper's."""
    import neurenix

    protocol = reproduction.protocol
    return {
        "neurenix": neurenix.__version__,
        "protocol": protocol.name,
        "paper": protocol.title,
        "dataset": reproduction.dataset,
        "data": reproduction.data,
        "compared_with_paper": reproduction.compares,
        "note": None if reproduction.compares else _no_comparison(reproduction),
        "seeds": reproduction.seeds,
        "epochs_per_task": reproduction.epochs,
        "metric": "final average accuracy over the 5 tasks, % (std: numpy's, ddof=0)",
        "sources": protocol.sources,
        "scenarios": {
            scenario: {
                result.method: {
                    "table_2_row": result.row,
                    "flags": result.flags,
                    "hyperparameters": result.hyperparameters,
                    "average_accuracy": {str(seed): value for seed, value in result.per_seed.items()},
                    "accuracy_matrix": {str(seed): matrix for seed, matrix in result.matrices.items()},
                    "mean": result.mean,
                    "std": result.std,
                    "paper": (None if result.paper is None or not reproduction.compares else
                              {"mean": result.paper.mean, "std": result.paper.std, "source": result.paper.source}),
                }
                for result in results
            }
            for scenario, results in reproduction.results.items()
        },
    }


def _write(reproduction: Reproduction, output: Path) -> dict[str, Path]:
    output.mkdir(parents=True, exist_ok=True)
    results, table, figure = (output / name for name in REPRODUCE_FILES)
    results.write_text(json.dumps(results_document(reproduction), indent=1) + "\n")
    table.write_text(f"# {reproduction.protocol.title}\n\n{result_tables(reproduction, markdown=True)}\n")
    draw_reproduction(reproduction).save(figure)
    return {"results": results, "table": table, "figure": figure, "logs": output / RUNS}


# ---------------------------------------------------------------------------- the figure
_OURS, _PAPER = "#1f77b4", "#ff7f0e"  # matplotlib's first two "tab10" colours
_PANEL_H, _TOP, _BOTTOM, _LEFT, _BAR, _GAP = 300, 70, 40, 46, 16, 18


def draw_reproduction(reproduction: Reproduction) -> Any:
    """One panel per scenario, side by side: per method our mean ± std (bar, error bar), the paper's beside it."""
    from PIL import Image, ImageDraw

    from neurenix.metrics.drawing import font

    title = f"{reproduction.protocol.title}: split {reproduction.data}"
    note = ("paper: Table 2 (a bar without an error bar: the std was not found)" if reproduction.compares
            else _no_comparison(reproduction))
    panels = [_panel_width(len(results)) for results in reproduction.results.values()]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = max(sum(panels) + 20, int(measure.textlength(title, font=font(14))) + 30,
                int(measure.textlength(note, font=font(12))) + 300)
    image = Image.new("RGB", (width, _TOP + _PANEL_H + 10), "white")
    draw = ImageDraw.Draw(image)
    draw.text((12, 8), title, fill="black", font=font(14))
    legend = [("ours: mean ± std over the seeds", _OURS)] + ([("paper", _PAPER)] if reproduction.compares else [])
    x = 12
    for label, colour in legend:
        draw.rectangle((x, 36, x + 12, 46), fill=colour)
        draw.text((x + 18, 34), label, fill="black", font=font(12))
        x += 30 + int(draw.textlength(label, font=font(12)))
    draw.text((x + 10, 34), note, fill="#555555", font=font(12))
    left = 10
    for (scenario, results), panel in zip(reproduction.results.items(), panels):
        _bars(draw, reproduction, SCENARIO_TITLES[scenario], results, (left, _TOP))
        left += panel
    return image


def _panel_width(methods: int) -> int:
    return _LEFT + methods * (2 * _BAR + _GAP) + 20


def _bars(draw: Any, reproduction: Reproduction, title: str, results: list[ScenarioResult], origin: tuple[int, int]) -> None:
    from neurenix.metrics.drawing import font

    left, top = origin
    x0, x1 = left + _LEFT, left + _panel_width(len(results)) - 20
    y0, y1 = top + _PANEL_H - _BOTTOM, top + 24  # y0: 0 %, y1: 100 %

    def y(percent: float) -> float:
        return y0 - (y0 - y1) * min(max(percent, 0.0), 100.0) / 100

    draw.text((x0, top + 2), title, fill="black", font=font(13))
    for tick in (0, 25, 50, 75, 100):
        draw.line((x0, y(tick), x1, y(tick)), fill="#e6e6e6")
        draw.text((left + 6, y(tick) - 7), f"{tick}%", fill="#555555", font=font(11))
    for index, result in enumerate(results):
        start = x0 + _GAP / 2 + index * (2 * _BAR + _GAP)
        bars = [(result.mean, result.std, _OURS)]
        if reproduction.compares and result.paper is not None:
            bars.append((result.paper.mean, result.paper.std, _PAPER))
        for offset, (mean, std, colour) in enumerate(bars):
            x = start + offset * _BAR
            draw.rectangle((x, y(mean), x + _BAR - 2, y0), fill=colour)
            if std:  # the error bar: mean ± std
                middle = x + (_BAR - 2) / 2
                draw.line((middle, y(mean - std), middle, y(mean + std)), fill="black")
                for end in (mean - std, mean + std):
                    draw.line((middle - 3, y(end), middle + 3, y(end)), fill="black")
        label = result.method if len(result.method) <= 10 else result.method[:9] + "."
        middle = start + _BAR - 1
        draw.text((middle - draw.textlength(label, font=font(9)) / 2, y0 + 6), label, fill="black", font=font(9))


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise UsageError(f"--output {str(output)!r} is a file, not a folder")
    found = [name for name in (*REPRODUCE_FILES, RUNS) if (output / name).exists()]
    if found and not overwrite:
        raise UsageError(f"--output {str(output)!r} already holds a reproduction ({', '.join(found)}); choose another "
                         "folder, or add --overwrite to replace its files")


def _remove_earlier(output: Path, overwrite: bool) -> None:
    """With ``--overwrite``: the earlier reproduction's files, and the folders they leave empty (nothing else)."""
    if not overwrite:
        return
    for name in REPRODUCE_FILES:
        (output / name).unlink(missing_ok=True)
    runs = output / RUNS
    for scenario in SCENARIOS:
        for seed_folder in sorted((runs / scenario).glob("seed_*")):
            remove_run(seed_folder)
            _remove_if_empty(seed_folder)
        _remove_if_empty(runs / scenario)
    _remove_if_empty(runs)


def _remove_if_empty(folder: Path) -> None:
    if folder.is_dir() and not any(folder.iterdir()):
        shutil.rmtree(folder)
