"""The runs behind ``neurenix compare``: the data, a model, the methods, one Trainer per run.

Each method gets, for each seed, the same benchmark, the same seed (so the same initial weights
and batch order) and a fresh model; a ``ForgettingCurves`` callback measures every task after
every epoch, and the values it logs are kept (:class:`CurveRecorder`) for the plot.
:func:`run_many` runs a list of such runs, one after the other or in joblib's loky processes.
This module imports torch and Lightning; it knows nothing of the reports
(:mod:`neurenix.cli.report` reads what it returns).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor, nn
from typing_extensions import override

from neurenix.cli.output import TENSORBOARD
from neurenix.cli.settings import (
    BASELINES,
    CompareError,
    DistillationSettings,
    EWCSettings,
    OnlineEWCSettings,
    ReplaySettings,
    UsageError,
    seeds_of,
)
from neurenix.continual import (
    AGEM,
    ERACE,
    EWC,
    GEM,
    MAS,
    BiC,
    ContinualLossMixin,
    DarkExperienceReplay,
    ExperienceReplay,
    GDumb,
    ICaRL,
    KnowledgeDistillation,
    L2Regularization,
    RWalk,
    SynapticIntelligence,
)
from neurenix.continual.seen_classes import SeenClassMask
from neurenix.data import (
    DownloadError,
    IDXFormatError,
    TaskSequenceDataModule,
    fit_sequence,
    permuted_benchmark,
    split_benchmark,
)
from neurenix.data.benchmarks import TaskSequence
from neurenix.metrics import ForgettingCurves

__all__ = [
    "CurveRecorder", "DataSource", "MLPClassifier", "MethodRun", "SequenceProgressBar", "cpu_threads", "load_benchmark",
    "make_trainer", "method_callbacks", "quiet_lightning", "read_source", "run_many", "run_method", "run_seed", "task_label",
]


def task_label(task: int) -> str:
    """A task as every output of the command names it: by the id the API uses, from 0 (``task 0``)."""
    return f"task {task}"


def _ewc(model: nn.Module, s: EWCSettings, scenario: str) -> list:
    return [EWC(model, s.importance, s.fisher_sample_size, fisher=s.fisher)]


def _online_ewc(model: nn.Module, s: OnlineEWCSettings, scenario: str) -> list:
    return [EWC(model, s.importance, s.fisher_sample_size, fisher=s.fisher, online=True, gamma=s.gamma)]


def _distillation(model: nn.Module, s: DistillationSettings, scenario: str) -> list:
    # Class-incremental: distil only the units of the classes seen so far (the teacher knows no others).
    return [KnowledgeDistillation(model, s.temperature, s.alpha, units="seen" if scenario == "class" else "all")]


def _replay(model: nn.Module, s: ReplaySettings, scenario: str) -> list:
    return [ExperienceReplay(model, s.memory_size, s.replay_ratio, offer=s.offer)]


#: name -> builder of the callbacks; ``none`` (plain fine-tuning) has none.
def _one_head(name: str, scenario: str) -> None:
    if scenario == "task":  # one head per task: labels repeat across tasks, class means or biases would mix them
        raise ValueError(f"{name} learns classes incrementally over one head: use --scenario class or domain, not task")


def _icarl(model: nn.Module, s: Any, scenario: str) -> ICaRL:
    _one_head("icarl", scenario)
    return ICaRL(model, memory_size=s.memory_size, feature_extractor=model.body, replay_ratio=s.replay_ratio)


def _bic(model: nn.Module, s: Any, scenario: str) -> BiC:
    _one_head("bic", scenario)
    return BiC(model, memory_size=s.memory_size, feature_extractor=model.body, replay_ratio=s.replay_ratio)


_BUILDERS: dict[str, Callable[..., list]] = {
    "ewc": _ewc,
    "online_ewc": _online_ewc,
    "si": lambda model, s, scenario: [SynapticIntelligence(model, s.importance, s.xi)],
    "l2": lambda model, s, scenario: [L2Regularization(model, s.importance)],
    "distillation": _distillation,
    "replay": _replay,
    # der and derpp: one class, DER++ being DER with a cross-entropy term on a second memory batch (beta > 0).
    "der": lambda model, s, scenario: [
        DarkExperienceReplay(model, memory_size=s.memory_size, alpha=s.alpha, replay_ratio=s.replay_ratio)
    ],
    "derpp": lambda model, s, scenario: [
        DarkExperienceReplay(model, memory_size=s.memory_size, alpha=s.alpha, beta=s.beta, replay_ratio=s.replay_ratio)
    ],
    "er_ace": lambda model, s, scenario: [ERACE(model, memory_size=s.memory_size, replay_ratio=s.replay_ratio)],
    "agem": lambda model, s, scenario: [AGEM(model, memory_size=s.memory_size, reference_size=s.reference_size)],
    "gem": lambda model, s, scenario: [GEM(model, memory_size=s.memory_size, margin=s.margin)],
    "icarl": lambda model, s, scenario: [_icarl(model, s, scenario)],
    "bic": lambda model, s, scenario: [_bic(model, s, scenario)],
    "gdumb": lambda model, s, scenario: [GDumb(model, memory_size=s.memory_size)],
    "mas": lambda model, s, scenario: [MAS(model, importance=s.importance, sample_size=s.sample_size)],
    "rwalk": lambda model, s, scenario: [
        RWalk(model, importance=s.importance, alpha=s.alpha, epsilon=s.epsilon, interval=s.interval)
    ],
}


def method_callbacks(name: str, model: nn.Module, settings: Any, scenario: str) -> list:
    """The callbacks of method ``name``; a bad hyper-parameter raises :class:`UsageError` naming its flag.

    ``none`` and the baselines (``joint``, ``cumulative``: the data module's ``training``) have none.
    """
    if name == "none" or name in BASELINES:
        return []
    options = getattr(settings, name)
    try:
        return _BUILDERS[name](model, options, scenario)
    except (TypeError, ValueError) as error:
        message = str(error)
        known = message.split(" ", 1)[0] in vars(options)
        raise UsageError(f"--{name}.{message}" if known else f"--{name}: {message}") from None


# ---------------------------------------------------------------------------- model
class MLPClassifier(ContinualLossMixin, L.LightningModule):
    """Two hidden ReLU layers and a linear head; ``heads > 1``: one head per task (task-incremental).

    Args:
        inputs: input features (images are flattened).
        classes: output units per head.
        hidden: units per hidden layer.
        heads: output heads; with more than one, ``forward`` needs the task ids.
        lr: Adam's learning rate.
        mask_unseen_classes: end in a :class:`~neurenix.continual.seen_classes.SeenClassMask`
            (``self.mask``; one head only): the logits of classes not seen yet are masked out.
    """

    def __init__(
        self, inputs: int, classes: int, hidden: int = 128, heads: int = 1, lr: float = 1e-3,
        mask_unseen_classes: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, classes * heads)
        if mask_unseen_classes and heads > 1:
            raise ValueError(f"mask_unseen_classes needs one head (class-incremental), got heads={heads}")
        self.mask = SeenClassMask(classes) if mask_unseen_classes else None
        self.classes, self.heads, self.lr = classes, heads, lr

    def forward(self, x: Tensor, task_ids: Optional[Tensor] = None) -> Tensor:
        logits = self.head(self.body(x))
        if self.mask is not None:
            return self.mask(logits)
        if self.heads == 1:
            return logits
        if task_ids is None:
            raise ValueError("a multi-head MLPClassifier needs the task ids: model(x, task_ids)")
        return logits.view(len(x), self.heads, self.classes)[torch.arange(len(x), device=x.device), task_ids]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y, *task_ids = batch
        loss = nn.functional.cross_entropy(self(x, *task_ids), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


# ---------------------------------------------------------------------------- logging helpers
class CurveRecorder(Logger):
    """Keeps the ``accuracy/task_{j}`` and ``continual/*`` values the callbacks log, in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.history: dict[str, list[tuple[int, float]]] = {}

    @property
    def name(self) -> str:
        return "curves"

    @property
    def version(self) -> int:
        return 0

    @override
    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        for key, value in metrics.items():
            if key.startswith(("accuracy/", "continual/")):
                self.history.setdefault(key, []).append((int(step or 0), float(value)))

    @override
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


class SequenceProgressBar(TQDMProgressBar):
    """Lightning's bar, labelled ``method: task t of 0-N, epoch e/E``, cleared after each task."""

    def __init__(self, label: str, epochs_per_task: int) -> None:
        super().__init__()
        self.label, self.epochs_per_task = label, epochs_per_task

    @override
    def init_train_tqdm(self):
        bar = super().init_train_tqdm()
        bar.leave = False  # the per-method summary line replaces the finished bars
        return bar

    @override
    def on_train_epoch_start(self, trainer: "L.Trainer", *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        data = trainer.datamodule
        epoch = trainer.current_epoch - data.task_start["epoch"] + 1
        self.train_progress_bar.set_description(
            f"{self.label}: {task_label(data.current_task)} of 0-{data.num_tasks - 1}, epoch {epoch}/{self.epochs_per_task}"
        )


@contextlib.contextmanager
def cpu_threads(threads: int) -> Iterator[None]:
    """PyTorch's intra-op threads set to ``threads`` (0: unchanged) for the block."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's INFO banners and the warnings meant for long real runs off; the progress bar stays."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    with warnings.catch_warnings():
        # In-memory tensors batched by index: worker processes would only add start-up time.
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning's, about newer PyTorch
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


# ---------------------------------------------------------------------------- the comparison
@dataclass
class MethodRun:
    """What one method's run with one seed left: the metrics after the last task, the matrix, the curves.

    ``training`` is the data module's (``joint``, ``cumulative`` for those baselines). A joint run
    measures every task once, after its one fit: its matrix has that row only (the others NaN),
    and its backward transfer and forgetting are NaN (there is no sequence).
    """

    name: str
    hyperparameters: dict[str, Any]
    matrix: Tensor
    initial: Tensor
    average_accuracy: float
    backward_transfer: float
    forgetting: float
    forward_transfer: float
    wall_time: float
    log_dir: str
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    seed: int = 0
    training: str = "sequential"


@dataclass
class DataSource:
    """What a benchmark was read from, for the description line and the reports.

    Attributes:
        name: the data the files hold: ``digits``, ``MNIST``, ``Fashion-MNIST``, or ``--dataset``
            when the reader cannot tell (a subset, another dataset in this format).
        folder: the folder the IDX files were read from; ``None`` for digits (scikit-learn's).
        requested: ``--dataset``, when the files are another dataset's.
        warnings: what the reader warned about, one line each, for stderr.
    """

    name: str
    folder: Optional[Path] = None
    requested: Optional[str] = None
    warnings: list[str] = field(default_factory=list)


#: ``--dataset`` -> the name the MNIST reader recognizes its files by (its ``recognized_as``).
_DATASET_NAMES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}


def run_seed(settings: Any) -> int:
    """The seed of a run: ``settings.seed``, else the first of ``settings.seeds``, else 0."""
    return seeds_of(settings)[0] if settings.seed is None else settings.seed


def load_benchmark(settings: Any) -> tuple[TaskSequence, DataSource]:
    """The task sequence the settings name (its class order or permutations from :func:`run_seed`), and what it was read from.

    Raises:
        CompareError: the data is missing, unreadable, or not the dataset asked for.
        UsageError: the settings do not fit the data (the benchmark's own checks).
    """
    source, data = read_source(settings)
    options = dict(num_tasks=settings.num_tasks, seed=run_seed(settings), scenario=settings.scenario)
    try:
        if settings.benchmark == "split":
            return split_benchmark(source, classes_per_task=10 // settings.num_tasks, **options), data
        return permuted_benchmark(source, **options), data
    except ValueError as error:
        raise UsageError(str(error)) from None


def read_source(settings: Any) -> tuple[Any, DataSource]:
    """The (train, test) datasets of ``--dataset`` (``"digits"``: its name), each error as :class:`CompareError`."""
    if settings.dataset == "digits":
        return "digits", DataSource("digits")
    from neurenix.data import MNIST, FashionMNIST

    reader = MNIST if settings.dataset == "mnist" else FashionMNIST
    root = Path(settings.data_root)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train, test = (reader(root, train=part, download=settings.download) for part in (True, False))
    except FileNotFoundError:
        raise CompareError(_missing_data_message(settings.dataset, root, reader.folder)) from None
    except DownloadError as error:
        raise CompareError(
            f"--download: {_first_line(error)}; if you have the {settings.dataset} files, point --data_root at their "
            f"folder (it is {str(root)!r})"
        ) from None
    except (IDXFormatError, OSError, ValueError) as error:
        raise CompareError(f"{settings.dataset} data in --data_root {str(root)!r}: {_first_line(error)}") from None
    return (train, test), _data_source(settings.dataset, train, [str(w.message) for w in caught])


def _data_source(dataset: str, train: Any, warned: list[str]) -> DataSource:
    folder = train.raw_folder if any(train.raw_folder.glob("*-ubyte*")) else train.root  # the reader's order
    recognized = getattr(train, "recognized_as", None)  # the reader's fingerprint of full splits, if it has one
    data = DataSource(recognized or _DATASET_NAMES[dataset], folder)
    if recognized not in (None, _DATASET_NAMES[dataset]):
        data.requested = dataset
        data.warnings.append(
            f"--data_root {str(train.root)!r} holds {recognized}, not {_DATASET_NAMES[dataset]}: it is read as given "
            f"(--dataset {dataset}); the results are about {recognized}"
        )
        warned = [message for message in warned if recognized not in message]  # the reader's own words for it
    data.warnings += [_first_line(message) for message in warned]
    return data


def _missing_data_message(dataset: str, root: Path, folder: str) -> str:
    raw = root / folder / "raw"
    where = "does not exist" if not root.is_dir() else f"lacks its IDX files (looked in {root} and {raw})"
    return (
        f"no {dataset} data: --data_root {str(root)!r} {where}; point --data_root at the folder with "
        "the IDX files, or add --download to fetch them"
    )


def _first_line(error: Any) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def make_trainer(settings: Any, **options: Any) -> "L.Trainer":
    """A Trainer on the settings' hardware (no process started yet).

    Raises:
        UsageError: a configuration Lightning refuses, or a strategy that starts its processes
            from this one (see :func:`_refuse_multiprocessing`).
    """
    try:
        trainer = L.Trainer(
            accelerator=settings.accelerator, devices=settings.devices, strategy=settings.strategy,
            enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=10, **options,
        )
    except Exception as error:  # Lightning's MisconfigurationException, ValueError, ...: a bad hardware option
        raise UsageError(f"--accelerator/--devices/--strategy: {_first_line(error)}") from None
    _refuse_multiprocessing(trainer, settings.strategy)
    return trainer


def _refuse_multiprocessing(trainer: "L.Trainer", strategy: str) -> None:
    """Refuse a strategy whose launcher starts the device processes with ``multiprocessing``.

    Those strategies (``ddp_spawn``, ``ddp_fork``, ``ddp_notebook``, their ``*_find_unused_*``
    variants, XLA's) pickle the model, the methods and the data into children that the methods do
    not support, and they died there with a message that did not say why. ``ddp`` (Lightning's
    script launcher) runs the whole command once per device, which works. Checked on the
    Trainer, before any process starts, so that ``auto`` resolving to ``ddp_fork`` (in a notebook)
    is refused too.
    """
    launcher = trainer.strategy.launcher
    if isinstance(launcher, _MultiProcessingLauncher):
        start = getattr(launcher, "_start_method", "spawn")
        raise UsageError(
            f"--strategy {strategy}: its processes start from this one (multiprocessing, {start!r}), which the "
            "continual-learning methods cannot run in; use --strategy ddp"
        )


def _log_folder(name: str, settings: Any) -> tuple[Path, str]:
    """The TensorBoard logger's (root, version): ``<method>``, or ``<method>/seed_<s>`` with several seeds."""
    if len(seeds_of(settings)) > 1:
        return Path(name), f"seed_{run_seed(settings)}"
    return Path(), name


def run_method(name: str, settings: Any, benchmark: Any, output: Path, progress: bool) -> tuple[MethodRun, bool]:
    """Train a fresh model on the benchmark with method ``name``; returns its run and whether this is rank zero.

    Args:
        name: the method (``none``: plain fine-tuning; ``joint``, ``cumulative``: those baselines).
        settings: the command's settings; the run's seed is :func:`run_seed`'s.
        benchmark: the tasks (drawn with that seed).
        output: the run's folder; the TensorBoard logs go to ``output/tensorboard/<name>`` (with
            several ``settings.seeds``: ``output/tensorboard/<name>/seed_<seed>``).
        progress: show Lightning's progress bar (on a terminal only: redirected, its redraws
            would fill the file).
    """
    seed = run_seed(settings)
    L.seed_everything(seed, verbose=False)
    heads = benchmark.num_tasks if benchmark.scenario == "task" else 1
    inputs = math.prod(benchmark.input_shape)
    model = MLPClassifier(inputs, benchmark.num_classes, settings.hidden, heads, settings.lr, settings.mask_unseen_classes)
    methods = method_callbacks(name, model, settings, benchmark.scenario)
    # A method that predicts otherwise than the network's outputs (iCaRL: nearest mean of exemplars;
    # BiC: bias-corrected logits) is measured so.
    predictor = next((m.classifier for m in methods if getattr(m, "classifier", None) is not None), None)
    # Its curves have a point at each task's end only: its predictor is fitted when a task ends.
    curves = ForgettingCurves(every_n_epochs=None if predictor else 1, predictor=predictor)
    recorder = CurveRecorder()
    # One run per folder (neurenix.cli.output): the run's own folder, no version_N below it.
    root, version = _log_folder(name, settings)
    tensorboard = TensorBoardLogger(output / TENSORBOARD / root, name="", version=version, default_hp_metric=False)
    bars = [SequenceProgressBar(name, settings.epochs)] if progress else []
    trainer = make_trainer(
        settings, callbacks=[*methods, curves, *bars], logger=[tensorboard, recorder], enable_progress_bar=progress
    )
    training = name if name in BASELINES else "sequential"
    datamodule = TaskSequenceDataModule.from_benchmark(
        benchmark, batch_size=settings.batch_size, eval_batch_size=512, seed=seed, training=training,
        keep_on_device=settings.keep_on_device,
    )
    start = time.perf_counter()
    fit_sequence(  # one event file per run
        trainer, model, datamodule, epochs_per_task=settings.epochs, keep_optimizer_state=settings.keep_optimizer_state
    )
    wall_time = time.perf_counter() - start
    if trainer.interrupted:
        raise CompareError(f"training with {name} stopped before the last task")
    matrix = curves.matrix
    hyperparameters = {key: value for method in methods for key, value in method.hyperparameters().items()}
    run = MethodRun(
        name, hyperparameters, matrix.accuracies().cpu(), matrix.initial.cpu(),
        float(matrix.average_accuracy()), float(matrix.backward_transfer()), float(matrix.forgetting()),
        float(matrix.forward_transfer()), wall_time, tensorboard.log_dir, recorder.history, seed, training,
    )
    return run, trainer.is_global_zero


#: One run for :func:`run_many`: (method name, settings, benchmark, output folder), as :func:`run_method` takes them.
RunCall = tuple[str, Any, Any, Path]


def run_many(
    calls: Sequence[RunCall], jobs: int = 1, *, progress: bool = False, done: Optional[Callable[[MethodRun], None]] = None
) -> list[MethodRun]:
    """Run :func:`run_method` for each call, ``jobs`` at a time; returns their runs in the order of ``calls``.

    With ``jobs`` 1 the runs are made here, one after the other; with more, each in a process of
    joblib's ``loky`` backend (as ``GridSearch(n_jobs=...)``). Either way each run is seeded by
    :func:`run_method` and runs with the same number of PyTorch threads (``settings.threads``, or
    this process's count when it is 0), so the results are equal bit for bit. Lightning's notes
    are quietened (:func:`quiet_lightning`). joblib keeps its worker processes for the next call
    (they exit after a few idle minutes, or with
    ``joblib.externals.loky.get_reusable_executor().shutdown()``).

    Args:
        calls: the runs, each ``(name, settings, benchmark, output)``.
        jobs: runs at once, >= 1. Not for DDP runs (the command refuses ``--jobs`` > 1 with one).
        progress: show each run's progress bar (``jobs`` 1 only: the processes' bars would mix).
        done: called with each run as it is returned, in order (the command prints a line).

    Raises:
        ValueError: ``jobs`` < 1.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an int >= 1, got {jobs!r}")
    runs = []
    for run in _runs(list(calls), jobs, progress):
        runs.append(run)
        if done is not None:
            done(run)
    return runs


def _runs(calls: list[RunCall], jobs: int, progress: bool) -> Iterator[MethodRun]:
    if jobs == 1 or len(calls) <= 1:
        for name, settings, benchmark, output in calls:
            with quiet_lightning(), cpu_threads(settings.threads):
                yield run_method(name, settings, benchmark, output, progress)[0]
        return
    import joblib  # scikit-learn's dependency: imported only for parallel runs

    threads = [settings.threads or torch.get_num_threads() for _, settings, _, _ in calls]
    work = (joblib.delayed(_run_in_process)(*call, count) for call, count in zip(calls, threads))
    yield from joblib.Parallel(n_jobs=min(jobs, len(calls)), backend="loky", return_as="generator")(work)


def _run_in_process(name: str, settings: Any, benchmark: Any, output: Path, threads: int) -> MethodRun:
    """One run in a worker process, with the caller's number of PyTorch threads (a float sum split
    over another number of threads may round differently)."""
    torch.set_num_threads(threads)
    with quiet_lightning():
        return run_method(name, settings, benchmark, output, progress=False)[0]
