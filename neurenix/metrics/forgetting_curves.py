"""Forgetting curves: every task's test accuracy over the whole sequence, logged as it happens."""

from __future__ import annotations

import math
from numbers import Integral
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
from neurenix.continual.distributed import StaysInItsProcess
from neurenix.metrics.accuracy_matrix import AccuracyMatrix, accuracy_ratio
from neurenix.metrics.drawing import draw_accuracy_matrix

__all__ = ["ForgettingCurves", "accuracy_heatmap"]


class ForgettingCurves(StaysInItsProcess, Callback):
    """Evaluate every task's test set after each task (and optionally during it) and log it.

    Needs a datamodule with ``num_tasks``, ``current_task`` and a ``test_dataloader()`` that
    returns one loader per task (``neurenix.data.TaskSequenceDataModule``). Logs, with any
    Lightning logger, at the trainer's global step:

    - ``accuracy/task_{id}``: each task's test accuracy, one curve per task, starting with the
      untrained model at the first task's start; forgetting shows as a falling curve;
    - ``continual/average_accuracy``, ``continual/backward_transfer``,
      ``continual/forward_transfer``, ``continual/forgetting`` after each task (the last three
      from the second task on: they are undefined before);
    - with a ``TensorBoardLogger``: the accuracy matrix as a labelled heatmap image
      (:func:`accuracy_heatmap`) and as a text table, and the run's hyper-parameters (the
      methods' and this callback's).

    Every output names a task by its id, the number the methods read from the datamodule's
    ``current_task``: ``0 .. num_tasks-1`` in the order of ``test_dataloader()`` by default (the
    numbering of ``TaskSequenceDataModule`` and of the benchmarks), or the ids given as
    ``task_ids`` for a datamodule of your own that numbers its tasks otherwise (e.g. ``1, 2``).

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

    With ``predictor``, each task's accuracy after training is that of ``predictor(inputs,
    task_ids)`` instead of the LightningModule's outputs: any callable returning ``(N, C)``
    scores (or ``(N,)`` labels), such as iCaRL's nearest-mean-of-exemplars classifier
    (:class:`~neurenix.continual.exemplars.NearestMeanClassifier`). It is called as the module
    would be (in eval mode, without gradients, the inputs converted, under the precision context,
    on each process's share of the test sets; ``task_ids`` ``None`` for batches without them).
    The untrained model's accuracy (the first task's start) is the module's own: a predictor
    built on what training produces (exemplars, class means) has nothing to predict with yet.
    A predictor that is updated at a task's end (NCM's means) must be so before this callback
    measures the task: list the method that updates it before ``ForgettingCurves`` in
    ``callbacks``.

    Attributes:
        matrix: the :class:`AccuracyMatrix`, row and column ``k`` for the task ``task_ids[k]``.
        task_ids: the id of each row and column of :attr:`matrix` (known from the fit's setup).

    Args:
        every_n_epochs: also log every task's accuracy every ``n`` epochs inside a task
            (``None``: only at task ends).
        task_ids: the id of each task, in the order of the datamodule's ``test_dataloader()``
            loaders: the values its ``current_task`` takes. ``None``: ``0 .. num_tasks-1``.
        predictor: ``predictor(inputs, task_ids) -> scores`` to evaluate instead of the
            LightningModule after each task (and inside tasks); ``None``: the module.

    Raises:
        TypeError: ``task_ids`` is not a sequence of ints, or ``predictor`` is not callable.
        ValueError: ``every_n_epochs < 1``, or ``task_ids`` is empty or names a task twice.
            At the fit's setup: ``task_ids`` does not name one task per test loader; at a
            task's start, before it trains: a ``current_task`` that is not one of the tasks.

    Example::

        # A datamodule of your own whose current_task is 1, then 2, as in the API's examples:
        curves = ForgettingCurves(task_ids=[1, 2])   # logs accuracy/task_1 and accuracy/task_2
    """

    def __init__(
        self,
        every_n_epochs: Optional[int] = None,
        task_ids: Optional[Sequence[int]] = None,
        predictor: Optional[Callable[..., Tensor]] = None,
    ) -> None:
        if predictor is not None and not callable(predictor):
            raise TypeError(
                f"predictor must be a callable (inputs, task_ids) -> (N, C) scores, got {type(predictor).__name__}: {predictor!r:.80}"
            )
        self.predictor = predictor
        self.every_n_epochs = None if every_n_epochs is None else check_int("every_n_epochs", every_n_epochs, minimum=1)
        self._given_task_ids = None if task_ids is None else _checked_task_ids(task_ids)
        self.task_ids: list[int] = [] if task_ids is None else list(self._given_task_ids)
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
        self.task_ids = self._task_ids_of(datamodule)
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
        self._row_of(trainer.datamodule.current_task)  # a task id it cannot place: said before the task trains
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
        row = self._row_of(trainer.datamodule.current_task)
        self._evaluate(trainer, pl_module, after_task=row)
        self._log_summary(trainer, row)

    # ---------------------------------------------------------------------------- task ids
    def _task_ids_of(self, datamodule: Any) -> list[int]:
        if self._given_task_ids is None:
            return list(range(datamodule.num_tasks))
        if len(self._given_task_ids) != datamodule.num_tasks:
            raise ValueError(
                f"ForgettingCurves: task_ids={self._given_task_ids} names {len(self._given_task_ids)} tasks, but "
                f"{type(datamodule).__name__} has {datamodule.num_tasks}: give one id per test loader, in their order"
            )
        return list(self._given_task_ids)

    def _row_of(self, task_id: Any) -> int:
        """The matrix row (and column) of the task whose id is ``task_id``."""
        if isinstance(task_id, Integral) and not isinstance(task_id, bool) and int(task_id) in self.task_ids:
            return self.task_ids.index(int(task_id))
        if self._given_task_ids is None:
            advice = (
                f"number the tasks 0..{len(self.task_ids) - 1} in the order of test_dataloader(), or pass "
                "their ids in that order as ForgettingCurves(task_ids=[...])"
            )
        else:
            advice = "make current_task one of them, or fix task_ids"
        raise ValueError(
            f"ForgettingCurves: the datamodule's current_task is {task_id!r}, which is not one of its tasks "
            f"{self.task_ids} (the ids of test_dataloader()'s loaders): {advice}"
        )

    # ---------------------------------------------------------------------------- evaluation
    def _evaluate(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", after_task: Optional[int]) -> None:
        assert self.matrix is not None
        # A resumed task end re-measures its row: the row is replaced, never added to.
        self.matrix.record(*self._counts(trainer, pl_module, trained=after_task is not None), after_task=after_task)
        accuracies = self.matrix.initial if after_task is None else self.matrix.accuracies()[after_task]
        self._log_accuracies(trainer, accuracies)

    def _accuracies(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> Tensor:
        return accuracy_ratio(*self._counts(trainer, pl_module))

    def _counts(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", trained: bool = True) -> tuple[Tensor, Tensor]:
        """Correct predictions and samples on each task's whole test set, summed over processes:
        the predictor's once a task has trained, else the module's."""
        loaders = _task_loaders(trainer)
        rank, world_size = trainer.global_rank, trainer.world_size
        split = world_size > 1 and all(_splittable(loader) for loader in loaders)  # the same on every rank
        scratch = _matrix(len(loaders)).to(pl_module.device)
        precision = trainer.precision_plugin
        predict = self.predictor if self.predictor is not None and trained else None
        # Evaluated as Lightning's test loop evaluates: the inputs converted, the forward under the
        # fit's precision context (autocast for 16-mixed and bf16-mixed).
        with precision.test_step_context():
            for task, loader in enumerate(loaders):
                shard = _share(loader, rank, world_size) if split else loader
                for preds, targets in _predictions(pl_module, shard, precision.convert_input, predict):
                    scratch.update(preds, targets, task=task, after_task=None)
        counts = torch.stack([scratch.initial_correct, scratch.initial_total])
        if split:
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        return counts[0], counts[1]

    # ---------------------------------------------------------------------------- logging
    def _log_accuracies(self, trainer: "pl.Trainer", accuracies: Tensor) -> None:
        values = {f"accuracy/task_{task}": a for task, a in zip(self.task_ids, accuracies.tolist()) if not math.isnan(a)}
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)

    def _log_summary(self, trainer: "pl.Trainer", row: int) -> None:
        matrix = self.matrix
        assert matrix is not None
        summary = {
            "continual/average_accuracy": matrix.average_accuracy(row),
            "continual/backward_transfer": matrix.backward_transfer(row),
            "continual/forward_transfer": matrix.forward_transfer(row),
            "continual/forgetting": matrix.forgetting(row),
        }
        values = {name: float(v) for name, v in summary.items() if not math.isnan(float(v))}
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)
            if isinstance(logger, TensorBoardLogger) and trainer.is_global_zero:
                self._log_to_tensorboard(logger, trainer, row)
        if not self._hparams_logged:
            for logger in trainer.loggers:
                logger.log_hyperparams(_run_hyperparameters(trainer, self))
            self._hparams_logged = True

    def _log_to_tensorboard(self, logger: TensorBoardLogger, trainer: "pl.Trainer", row: int) -> None:
        matrix = self.matrix.accuracies()  # type: ignore[union-attr]
        writer = logger.experiment
        title = f"Test accuracy after task {self.task_ids[row]}"
        image = accuracy_heatmap(matrix, task_ids=self.task_ids, title=title)
        writer.add_image("continual/accuracy_matrix", image, trainer.global_step, dataformats="HWC")
        writer.add_text("continual/accuracy_matrix", _markdown_table(matrix, row, self.task_ids), trainer.global_step)

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


def _predictions(
    pl_module: "pl.LightningModule",
    loader: Any,
    convert_inputs: Callable[[Any], Any],
    predictor: Optional[Callable[..., Tensor]] = None,
):
    """``(outputs, targets)`` per batch, in eval mode without gradients, on the module's device,
    the inputs converted as the fit's precision converts its batches (``bf16-true``: to bfloat16);
    the outputs are ``predictor(inputs, task_ids)``'s where one is given."""
    device = pl_module.device
    with evaluation_mode(pl_module), torch.no_grad():
        for batch in loader:
            inputs, targets, task_ids = split_batch(batch)
            task_ids = None if task_ids is None else task_ids.to(device)
            inputs = convert_inputs(inputs.to(device))
            if predictor is not None:
                yield predictor(inputs, task_ids), targets.to(device)
            else:
                yield pl_module(*model_arguments(pl_module, inputs, task_ids)), targets.to(device)


def accuracy_heatmap(
    matrix: Tensor,
    cell: int = 48,
    *,
    task_ids: Optional[Sequence[int]] = None,
    title: str = "Test accuracy after each task",
) -> Tensor:
    """The accuracy matrix ``R`` as a figure to read: an ``(H, W, 3)`` float image in [0, 1].

    Rows are the task just trained ("after training task"), columns the task evaluated, both
    labelled with the task ids; each cell is coloured by its accuracy (viridis, 0 to 1) and shows
    it; unmeasured (``nan``) cells are grey, with a legend; a colour bar shows the scale. See
    :func:`neurenix.metrics.drawing.accuracy_matrix_layout`.

    Args:
        matrix: ``R``, square, ``nan`` where not measured.
        cell: the side of a cell in pixels (the figure grows with the number of tasks).
        task_ids: the id of each row's and column's task (default ``0 .. n-1``).
        title: the figure's title.
    """
    image = draw_accuracy_matrix(matrix, task_ids, title=title, cell=cell)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(image.height, image.width, 3)
    return pixels.float() / 255


def _markdown_table(matrix: Tensor, row: int, task_ids: Sequence[int]) -> str:
    """Rows ``0..row`` of ``R`` as a Markdown table, every task named by its id."""
    header = "| after \\ on | " + " | ".join(f"task {task}" for task in task_ids) + " |"
    rule = "|" + "---|" * (len(task_ids) + 1)
    rows = [
        f"| task {task_ids[i]} | " + " | ".join("" if math.isnan(v) else f"{v:.3f}" for v in matrix[i].tolist()) + " |"
        for i in range(row + 1)
    ]
    return "\n".join([header, rule, *rows])


def _checked_task_ids(task_ids: object) -> list[int]:
    if isinstance(task_ids, (str, bytes)) or not isinstance(task_ids, Sequence):
        raise TypeError(f"task_ids must be a sequence of ints, got {type(task_ids).__name__}: {task_ids!r}")
    for task in task_ids:
        if isinstance(task, bool) or not isinstance(task, Integral):
            raise TypeError(f"task_ids must hold ints, got {type(task).__name__} {task!r} in {list(task_ids)!r}")
    ids = [int(task) for task in task_ids]
    if not ids or len(set(ids)) != len(ids):
        raise ValueError(f"task_ids must name each task once (at least one), got {ids!r}")
    return ids


def _run_hyperparameters(trainer: "pl.Trainer", curves: ForgettingCurves) -> dict[str, Any]:
    params: dict[str, Any] = {"num_tasks": trainer.datamodule.num_tasks}
    for method in continual_methods(trainer):
        name = type(method).__name__
        for key, value in method.hyperparameters().items():
            params[f"{name}/{key}"] = value
    params["ForgettingCurves/every_n_epochs"] = curves.every_n_epochs or 0
    return params
