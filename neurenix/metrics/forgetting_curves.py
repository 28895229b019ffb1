"""Forgetting curves: every task's test accuracy over the whole sequence, logged as it happens."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, Subset
from typing_extensions import override

from neurenix.continual._checks import check_int
from neurenix.continual.base import evaluation_mode, model_arguments
from neurenix.continual.callback import continual_methods, split_batch
from neurenix.metrics.accuracy_matrix import AccuracyMatrix, accuracy_ratio

__all__ = ["ForgettingCurves", "accuracy_heatmap"]


class ForgettingCurves(Callback):
    """Evaluate every task's test set after each task (and optionally during it) and log it.

    Needs a datamodule with ``num_tasks``, ``current_task`` and a ``test_dataloader()`` that
    returns one loader per task (``neurenix.data.TaskSequenceDataModule``). Logs, with any
    Lightning logger, at the trainer's global step:

    - ``accuracy/task_{j}``: task ``j``'s test accuracy, one curve per task, starting with the
      untrained model at the first task's start; forgetting shows as a falling curve;
    - ``continual/average_accuracy``, ``continual/backward_transfer``,
      ``continual/forward_transfer``, ``continual/forgetting`` after each task (the last three
      from the second task on: they are undefined before);
    - with a ``TensorBoardLogger``: the accuracy matrix as a heatmap image and as a text table,
      and the run's hyper-parameters (the methods' and this callback's).

    The accuracy matrix (:attr:`matrix`) is part of the callback's checkpointed state.

    Under DDP every process evaluates its own share of each test set (samples ``rank``,
    ``rank + world_size``, ...: each sample exactly once) and the counts are summed across the
    processes before they enter the matrix, so every process holds the same matrix, that of the
    whole test sets, and the checkpoint (written by rank 0) does too. Test loaders that are not a
    ``DataLoader`` over a sized dataset cannot be split: then every process evaluates all of it.

    Evaluation batches are ``(inputs, targets)`` or ``(inputs, targets, task_ids)``; the model
    is called as ``model(inputs, task_ids)`` where its ``forward`` takes a second positional
    argument (a multi-head task-incremental model), else as ``model(inputs)``. It runs as in
    Lightning's test loop: in eval mode, without gradients, its inputs converted and its forward
    under the fit's precision (autocast for ``16-mixed`` and ``bf16-mixed``).

    Args:
        every_n_epochs: also log every task's accuracy every ``n`` epochs inside a task
            (``None``: only at task ends).
    """

    def __init__(self, every_n_epochs: Optional[int] = None) -> None:
        self.every_n_epochs = None if every_n_epochs is None else check_int("every_n_epochs", every_n_epochs, minimum=1)
        self.matrix: Optional[AccuracyMatrix] = None
        self._pending_state: Optional[dict[str, Any]] = None
        self._hparams_logged = False

    # ---------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        datamodule = trainer.datamodule
        missing = [name for name in ("num_tasks", "current_task", "test_dataloader") if not hasattr(datamodule, name)]
        if missing:
            raise ValueError(
                "ForgettingCurves needs a task-sequence datamodule (neurenix.data.TaskSequenceDataModule): "
                f"{type(datamodule).__name__} lacks {missing}"
            )
        if self.matrix is None or self.matrix.num_tasks != datamodule.num_tasks:
            self.matrix = _matrix(datamodule.num_tasks)
        if self._pending_state is not None:
            self.matrix.load_state_dict(self._pending_state)
            self._pending_state = None

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._training_ran = False

    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # A fit resumed from its last epoch end skips the training loop: measure the task here.
        if not getattr(self, "_training_ran", True) and trainer.state.stage is not None:
            self.matrix.to(pl_module.device)  # type: ignore[union-attr]
            self.on_train_end(trainer, pl_module)

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        assert self.matrix is not None  # setup ran
        self._training_ran = True
        self.matrix.to(pl_module.device)
        if int(self.matrix.total.sum()) == 0 and int(self.matrix.initial_total.sum()) == 0:
            self._evaluate(trainer, pl_module, after_task=None)

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        n = self.every_n_epochs
        if n is None or (trainer.current_epoch + 1) % n != 0 or _last_epoch_of_fit(trainer):
            return
        self._log_accuracies(trainer, self._accuracies(trainer, pl_module))

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        task = int(trainer.datamodule.current_task)
        self._evaluate(trainer, pl_module, after_task=task)
        self._log_summary(trainer, task)

    # ---------------------------------------------------------------------------- evaluation
    def _evaluate(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", after_task: Optional[int]) -> None:
        assert self.matrix is not None
        # A resumed task end re-measures its row: the row is replaced, never added to.
        self.matrix.record(*self._counts(trainer, pl_module), after_task=after_task)
        row = self.matrix.initial if after_task is None else self.matrix.accuracies()[after_task]
        self._log_accuracies(trainer, row)

    def _accuracies(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> Tensor:
        return accuracy_ratio(*self._counts(trainer, pl_module))

    def _counts(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> tuple[Tensor, Tensor]:
        """Correct predictions and samples on each task's whole test set, summed over processes."""
        loaders = _task_loaders(trainer)
        rank, world_size = trainer.global_rank, trainer.world_size
        split = world_size > 1 and all(_splittable(loader) for loader in loaders)  # the same on every rank
        scratch = _matrix(len(loaders)).to(pl_module.device)
        precision = trainer.precision_plugin
        # Evaluated as Lightning's test loop evaluates: the inputs converted, the forward under the
        # fit's precision context (autocast for 16-mixed and bf16-mixed).
        with precision.test_step_context():
            for task, loader in enumerate(loaders):
                shard = _share(loader, rank, world_size) if split else loader
                for preds, targets in _predictions(pl_module, shard, precision.convert_input):
                    scratch.update(preds, targets, task=task, after_task=None)
        counts = torch.stack([scratch.initial_correct, scratch.initial_total])
        if split:
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        return counts[0], counts[1]

    # ---------------------------------------------------------------------------- logging
    @staticmethod
    def _log_accuracies(trainer: "pl.Trainer", accuracies: Tensor) -> None:
        values = {f"accuracy/task_{j}": float(a) for j, a in enumerate(accuracies.tolist()) if not math.isnan(a)}
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)

    def _log_summary(self, trainer: "pl.Trainer", task: int) -> None:
        matrix = self.matrix
        assert matrix is not None
        summary = {
            "continual/average_accuracy": matrix.average_accuracy(task),
            "continual/backward_transfer": matrix.backward_transfer(task),
            "continual/forward_transfer": matrix.forward_transfer(task),
            "continual/forgetting": matrix.forgetting(task),
        }
        values = {name: float(v) for name, v in summary.items() if not math.isnan(float(v))}
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)
            if isinstance(logger, TensorBoardLogger) and trainer.is_global_zero:
                self._log_to_tensorboard(logger, trainer, task)
        if not self._hparams_logged:
            for logger in trainer.loggers:
                logger.log_hyperparams(_run_hyperparameters(trainer, self))
            self._hparams_logged = True

    def _log_to_tensorboard(self, logger: TensorBoardLogger, trainer: "pl.Trainer", task: int) -> None:
        matrix = self.matrix.accuracies()  # type: ignore[union-attr]
        writer = logger.experiment
        writer.add_image("continual/accuracy_matrix", accuracy_heatmap(matrix), trainer.global_step, dataformats="HWC")
        writer.add_text("continual/accuracy_matrix", _markdown_table(matrix, task), trainer.global_step)

    # ---------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"matrix": None if self.matrix is None else {k: v.clone() for k, v in self.matrix.state_dict().items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        matrix = state_dict.get("matrix")
        if matrix is None:
            return
        if self.matrix is not None and self.matrix.num_tasks == matrix["total"].shape[0]:
            self.matrix.load_state_dict(matrix)
        else:  # the datamodule (and so the size) is known only at setup
            self.matrix = _matrix(matrix["total"].shape[0])
            self.matrix.load_state_dict(matrix)


def _matrix(num_tasks: int) -> AccuracyMatrix:
    # Counts are summed across processes as they are measured (ForgettingCurves._counts), so
    # every process holds the whole matrix: compute() must not sum the copies again, nor wait
    # in a collective that only rank 0 enters (it draws the TensorBoard heatmap).
    return AccuracyMatrix(num_tasks, sync_on_compute=False)


def _splittable(loader: Any) -> bool:
    return (
        isinstance(loader, DataLoader)
        and not isinstance(loader.dataset, IterableDataset)
        and hasattr(loader.dataset, "__len__")
    )


def _share(loader: DataLoader, rank: int, world_size: int) -> DataLoader:
    """This process's share of ``loader``'s samples: ``rank``, ``rank + world_size``, ..."""
    batch_size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", None) or 1
    share = Subset(loader.dataset, range(rank, len(loader.dataset), world_size))
    return DataLoader(share, batch_size=batch_size, collate_fn=loader.collate_fn, num_workers=loader.num_workers)


def _last_epoch_of_fit(trainer: "pl.Trainer") -> bool:
    return trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs


def _task_loaders(trainer: "pl.Trainer") -> Sequence[Any]:
    loaders = trainer.datamodule.test_dataloader()
    if not isinstance(loaders, (list, tuple)) or len(loaders) != trainer.datamodule.num_tasks:
        raise ValueError(
            "ForgettingCurves needs test_dataloader() to return one loader per task "
            f"({trainer.datamodule.num_tasks}), got {type(loaders).__name__}"
        )
    return loaders


def _predictions(pl_module: "pl.LightningModule", loader: Any, convert_inputs: Callable[[Any], Any]):
    """``(outputs, targets)`` per batch, in eval mode without gradients, on the module's device,
    the inputs converted as the fit's precision converts its batches (``bf16-true``: to bfloat16)."""
    device = pl_module.device
    with evaluation_mode(pl_module), torch.no_grad():
        for batch in loader:
            inputs, targets, task_ids = split_batch(batch)
            task_ids = None if task_ids is None else task_ids.to(device)
            inputs = convert_inputs(inputs.to(device))
            yield pl_module(*model_arguments(pl_module, inputs, task_ids)), targets.to(device)


def accuracy_heatmap(matrix: Tensor, cell: int = 24) -> Tensor:
    """An ``(H, W, 3)`` float image of ``R``: dark blue (0) to yellow (1), grey where not measured."""
    values = matrix.float().clamp(0, 1)
    low, high = torch.tensor([0.13, 0.10, 0.40]), torch.tensor([0.99, 0.91, 0.15])
    rgb = low + values.nan_to_num(0).unsqueeze(-1) * (high - low)
    rgb[matrix.isnan()] = 0.5
    return rgb.repeat_interleave(cell, 0).repeat_interleave(cell, 1)


def _markdown_table(matrix: Tensor, task: int) -> str:
    tasks = matrix.shape[0]
    header = "| after \\ on | " + " | ".join(f"task {j}" for j in range(tasks)) + " |"
    rule = "|" + "---|" * (tasks + 1)
    rows = [
        f"| task {i} | " + " | ".join("" if math.isnan(v) else f"{v:.3f}" for v in matrix[i].tolist()) + " |"
        for i in range(task + 1)
    ]
    return "\n".join([header, rule, *rows])


def _run_hyperparameters(trainer: "pl.Trainer", curves: ForgettingCurves) -> dict[str, Any]:
    params: dict[str, Any] = {"num_tasks": trainer.datamodule.num_tasks}
    for method in continual_methods(trainer):
        name = type(method).__name__
        for key, value in method.hyperparameters().items():
            params[f"{name}/{key}"] = value
    params["ForgettingCurves/every_n_epochs"] = curves.every_n_epochs or 0
    return params
