"""The accuracy matrix of a task sequence as a torchmetrics ``Metric``."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torchmetrics import Metric

from neurenix.continual._checks import check_int
from neurenix.metrics import functional as MF

__all__ = ["AccuracyMatrix"]


class AccuracyMatrix(Metric):
    """Counts of correct predictions per (after task ``i``, on task ``j``), summed over processes.

    ``R[i, j]`` (:meth:`compute`) is the accuracy on task ``j``'s evaluation data after training
    task ``i``; row ``initial`` holds the accuracies of the untrained model (forward transfer
    needs them). Rows and columns are the tasks' places in the sequence, from 0: the task ids of
    a sequence the library builds; :class:`~neurenix.metrics.ForgettingCurves` keeps the ids of
    other sequences (``task_ids``) and labels its outputs with them. Counts, not accuracies, are the states, so that each process adds its share of
    the data and the sums are reduced before dividing (``dist_reduce_fx="sum"``). The states are
    persistent: they are part of ``state_dict`` and of Lightning checkpoints.

    Args:
        num_tasks: tasks in the sequence, ``>= 1``.

    Example::

        matrix = AccuracyMatrix(num_tasks=2)
        matrix.update(logits, labels, task=0, after_task=0)
        matrix.accuracies()       # R, nan where nothing was measured
        matrix.backward_transfer(after_task=1)
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, num_tasks: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_tasks = check_int("num_tasks", num_tasks, minimum=1)
        square = torch.zeros(num_tasks, num_tasks, dtype=torch.long)
        row = torch.zeros(num_tasks, dtype=torch.long)
        self.add_state("correct", default=square.clone(), dist_reduce_fx="sum", persistent=True)
        self.add_state("total", default=square.clone(), dist_reduce_fx="sum", persistent=True)
        self.add_state("initial_correct", default=row.clone(), dist_reduce_fx="sum", persistent=True)
        self.add_state("initial_total", default=row.clone(), dist_reduce_fx="sum", persistent=True)

    def update(self, preds: Tensor, target: Tensor, *, task: int, after_task: Optional[int]) -> None:
        """Count a batch of task ``task``'s evaluation data after training ``after_task``.

        Args:
            preds: logits or probabilities ``(N, C)``, or predicted labels ``(N,)``.
            target: labels ``(N,)``.
            task: the task the batch belongs to.
            after_task: the last task trained, or ``None`` for the untrained model.
        """
        self._check_task("task", task)
        if after_task is not None:
            self._check_task("after_task", after_task)
        labels = preds.argmax(dim=-1) if preds.dim() == target.dim() + 1 else preds
        if labels.shape != target.shape:
            raise ValueError(f"preds and target describe different samples: shapes {tuple(preds.shape)} and {tuple(target.shape)}")
        hits = (labels == target).sum()
        if after_task is None:
            self.initial_correct[task] += hits
            self.initial_total[task] += target.numel()
        else:
            self.correct[after_task, task] += hits
            self.total[after_task, task] += target.numel()

    def record(self, correct: Tensor, total: Tensor, *, after_task: Optional[int]) -> None:
        """Replace a whole row with counts measured elsewhere (one entry per task).

        ``ForgettingCurves`` counts each process's share of the test sets, sums the counts across
        processes, then records them: every process holds the same, complete row.

        Args:
            correct: correct predictions on each task's evaluation data, ``(num_tasks,)``.
            total: samples counted on each task, ``(num_tasks,)``.
            after_task: the last task trained, or ``None`` for the untrained model.
        """
        if after_task is not None:
            self._check_task("after_task", after_task)
        for name, counts in (("correct", correct), ("total", total)):
            if counts.shape != (self.num_tasks,):
                raise ValueError(f"{name} must hold one count per task, shape ({self.num_tasks},), got {tuple(counts.shape)}")
        if after_task is None:
            self.initial_correct.copy_(correct)
            self.initial_total.copy_(total)
        else:
            self.correct[after_task] = correct
            self.total[after_task] = total
        self._update_count += 1  # what update() would count: compute() reads fresh states
        self._computed = None

    def compute(self) -> Tensor:
        """``R`` as float64, ``nan`` where no sample was counted."""
        return accuracy_ratio(self.correct, self.total)

    def accuracies(self) -> Tensor:
        """``R`` as a ``(num_tasks, num_tasks)`` matrix, whatever the size (``compute`` squeezes 1x1)."""
        return self.compute().reshape(self.num_tasks, self.num_tasks)

    @property
    def initial(self) -> Tensor:
        """``b``: each task's accuracy before any training (``nan`` if not measured)."""
        return accuracy_ratio(self.initial_correct, self.initial_total)

    def average_accuracy(self, after_task: Optional[int] = None) -> Tensor:
        return MF.average_accuracy(self.accuracies(), after_task)

    def backward_transfer(self, after_task: Optional[int] = None) -> Tensor:
        return MF.backward_transfer(self.accuracies(), after_task)

    def forward_transfer(self, after_task: Optional[int] = None) -> Tensor:
        return MF.forward_transfer(self.accuracies(), self.initial, after_task)

    def forgetting(self, after_task: Optional[int] = None) -> Tensor:
        return MF.forgetting(self.accuracies(), after_task)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # Restored counts are measurements: compute() may read them without a new update().
        self._update_count = max(self._update_count, 1)
        self._computed = None

    def _check_task(self, name: str, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.num_tasks:
            raise ValueError(f"{name} must be an int in [0, {self.num_tasks - 1}], got {value!r}")


def accuracy_ratio(correct: Tensor, total: Tensor) -> Tensor:
    """``correct / total`` as float64, ``nan`` where ``total`` is 0 (nothing measured)."""
    correct, total = correct.double(), total.double()
    return torch.where(total > 0, correct / total.clamp_min(1), torch.full_like(total, float("nan")))
