"""The runs behind ``neurenix compare``: a model, the methods, one Trainer per method.

Each method gets the same benchmark, the same seed (so the same initial weights and batch
order) and a fresh model; a ``ForgettingCurves`` callback measures every task after every
epoch, and the values it logs are kept (:class:`CurveRecorder`) for the plot.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor, nn
from typing_extensions import override

from neurenix.cli_settings import (
    METHOD_SETTINGS,
    METHODS,
    CompareError,
    DistillationSettings,
    EWCSettings,
    OnlineEWCSettings,
    UsageError,
)
from neurenix.continual import (
    EWC,
    ContinualLossMixin,
    ExperienceReplay,
    KnowledgeDistillation,
    L2Regularization,
    SynapticIntelligence,
)
from neurenix.data import DownloadError, IDXFormatError, TaskSequenceDataModule, fit_sequence, permuted_benchmark, split_benchmark
from neurenix.metrics import ForgettingCurves

__all__ = [
    "METHODS", "METHOD_SETTINGS", "CompareError", "CurveRecorder", "MLPClassifier", "MethodRun",
    "UsageError", "run_compare",
]


def _ewc(model: nn.Module, s: EWCSettings, scenario: str) -> list:
    return [EWC(model, s.importance, s.fisher_sample_size, fisher=s.fisher)]


def _online_ewc(model: nn.Module, s: OnlineEWCSettings, scenario: str) -> list:
    return [EWC(model, s.importance, s.fisher_sample_size, fisher=s.fisher, online=True, gamma=s.gamma)]


def _distillation(model: nn.Module, s: DistillationSettings, scenario: str) -> list:
    # Class-incremental: distil only the units of the classes seen so far (the teacher knows no others).
    return [KnowledgeDistillation(model, s.temperature, s.alpha, units="seen" if scenario == "class" else "all")]


#: name -> builder of the callbacks; ``none`` (plain fine-tuning) has none.
_BUILDERS: dict[str, Callable[..., list]] = {
    "ewc": _ewc,
    "online_ewc": _online_ewc,
    "si": lambda model, s, scenario: [SynapticIntelligence(model, s.importance, s.xi)],
    "l2": lambda model, s, scenario: [L2Regularization(model, s.importance)],
    "distillation": _distillation,
    "replay": lambda model, s, scenario: [ExperienceReplay(model, s.memory_size, s.replay_ratio)],
}


def method_callbacks(name: str, model: nn.Module, settings: Any, scenario: str) -> list:
    """The callbacks of method ``name``; a bad hyper-parameter raises :class:`UsageError` naming its flag."""
    if name == "none":
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
    """

    def __init__(self, inputs: int, classes: int, hidden: int = 128, heads: int = 1, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, classes * heads)
        self.classes, self.heads, self.lr = classes, heads, lr

    def forward(self, x: Tensor, task_ids: Optional[Tensor] = None) -> Tensor:
        logits = self.head(self.body(x))
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
    """Lightning's bar, labelled ``method: task t/T, epoch e/E``, cleared after each task."""

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
            f"{self.label}: task {data.current_task + 1}/{data.num_tasks}, epoch {epoch}/{self.epochs_per_task}"
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
    """What one method's run left: the metrics after the last task, the matrix, the curves."""

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


def load_benchmark(settings: Any):
    """The task sequence the settings name; missing data raises :class:`CompareError`."""
    options = dict(num_tasks=settings.num_tasks, seed=settings.seed, scenario=settings.scenario,
                   root=settings.data_root, download=settings.download)
    try:
        if settings.benchmark == "split":
            return split_benchmark(settings.dataset, classes_per_task=10 // settings.num_tasks, **options)
        return permuted_benchmark(settings.dataset, **options)
    except FileNotFoundError:
        root = Path(settings.data_root)
        raw = root / {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}[settings.dataset] / "raw"
        where = "does not exist" if not root.is_dir() else f"lacks its IDX files (looked in {root} and {raw})"
        raise CompareError(
            f"no {settings.dataset} data: --data_root {str(root)!r} {where}; point --data_root at the folder with "
            "the IDX files, or add --download to fetch them"
        ) from None
    except (DownloadError, IDXFormatError, OSError) as error:
        raise CompareError(f"{settings.dataset} data: {str(error).splitlines()[0]}") from None
    except ValueError as error:
        raise UsageError(str(error)) from None


def make_trainer(settings: Any, **options: Any) -> "L.Trainer":
    """A Trainer on the settings' hardware; a configuration Lightning refuses raises :class:`UsageError`."""
    try:
        return L.Trainer(
            accelerator=settings.accelerator, devices=settings.devices, strategy=settings.strategy,
            enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=10, **options,
        )
    except Exception as error:  # Lightning's MisconfigurationException, ValueError, ...: a bad hardware option
        raise UsageError(f"--accelerator/--devices/--strategy: {str(error).splitlines()[0]}") from None


def run_method(name: str, settings: Any, benchmark: Any, output: Path) -> tuple[MethodRun, bool]:
    """Train a fresh model on the benchmark with method ``name``; returns its run and whether this is rank zero."""
    L.seed_everything(settings.seed, verbose=False)
    heads = benchmark.num_tasks if benchmark.scenario == "task" else 1
    inputs = math.prod(benchmark.input_shape)
    model = MLPClassifier(inputs, benchmark.num_classes, settings.hidden, heads, settings.lr)
    methods = method_callbacks(name, model, settings, benchmark.scenario)
    curves, recorder = ForgettingCurves(every_n_epochs=1), CurveRecorder()
    tensorboard = TensorBoardLogger(output / "tensorboard", name=name, default_hp_metric=False)
    trainer = make_trainer(
        settings, callbacks=[*methods, curves, SequenceProgressBar(name, settings.epochs)], logger=[tensorboard, recorder]
    )
    datamodule = TaskSequenceDataModule.from_benchmark(benchmark, batch_size=settings.batch_size, eval_batch_size=512, seed=settings.seed)
    start = time.perf_counter()
    fit_sequence(trainer, model, datamodule, epochs_per_task=settings.epochs)  # one event file per run
    wall_time = time.perf_counter() - start
    if trainer.interrupted:
        raise CompareError(f"training with {name} stopped before the last task")
    matrix = curves.matrix
    hyperparameters = {key: value for method in methods for key, value in method.hyperparameters().items()}
    run = MethodRun(
        name, hyperparameters, matrix.accuracies().cpu(), matrix.initial.cpu(),
        float(matrix.average_accuracy()), float(matrix.backward_transfer()), float(matrix.forgetting()),
        float(matrix.forward_transfer()), wall_time, tensorboard.log_dir, recorder.history,
    )
    return run, trainer.is_global_zero


def run_compare(settings: Any, config_yaml: str = "") -> list[MethodRun]:
    """Run every method of ``settings``; rank zero prints the table and writes the reports."""
    from neurenix.cli_report import describe, method_line, results_table, write_reports

    output = Path(settings.output)
    benchmark = load_benchmark(settings)
    for name in settings.methods:  # every option checked before the first run starts
        method_callbacks(name, MLPClassifier(1, 1), settings, benchmark.scenario)
    with quiet_lightning():
        make_trainer(settings, logger=False, enable_progress_bar=False)
    if rank_zero_only.rank == 0:
        print(describe(settings, benchmark), flush=True)
    runs, zero = [], True
    with quiet_lightning(), cpu_threads(settings.threads):
        for name in settings.methods:
            run, zero = run_method(name, settings, benchmark, output)
            runs.append(run)
            if zero:
                print(method_line(run), flush=True)
    if zero:
        print()
        print(results_table(runs))
        for label, path in write_reports(settings, benchmark, runs, output, config_yaml).items():
            print(f"{label:<12} {path}")
    return runs
