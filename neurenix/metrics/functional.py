"""Continual-learning metrics from an accuracy matrix, as pure functions.

``R[i, j]`` is the accuracy on task ``j`` after training tasks ``0..i`` (0-based places in the
sequence: the task ids of a sequence the library builds), ``b[j]`` the accuracy on task ``j`` of
the model at its random initialization. Every function takes the
matrix and the task after which the metric is wanted (``after_task``, default: the last row).

Where a metric is undefined, after the first task (there is no earlier task to transfer to or to
forget), it is ``nan``: a number that no plot or average can mistake for a measured value.

References: Lopez-Paz & Ranzato 2017 (GEM: average accuracy, backward and forward transfer);
Chaudhry et al. 2018 (RWalk: forgetting).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["average_accuracy", "backward_transfer", "forgetting", "forward_transfer"]


def _checked(matrix: Tensor, after_task: Optional[int]) -> tuple[Tensor, int]:
    if not isinstance(matrix, Tensor) or matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        shape = tuple(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
        raise ValueError(f"matrix must be a square (tasks x tasks) tensor, got {shape}")
    tasks = matrix.shape[0]
    if after_task is None:
        after_task = tasks - 1
    if isinstance(after_task, bool) or not isinstance(after_task, int) or not 0 <= after_task < tasks:
        raise ValueError(f"after_task must be an int in [0, {tasks - 1}], got {after_task!r}")
    return matrix.double(), after_task


def _nan(like: Tensor) -> Tensor:
    return torch.full((), float("nan"), dtype=torch.float64, device=like.device)


def average_accuracy(matrix: Tensor, after_task: Optional[int] = None) -> Tensor:
    """``A_k = 1/(k+1) · Σ_{j<=k} R[k, j]``: mean accuracy over the tasks learned so far."""
    matrix, k = _checked(matrix, after_task)
    return matrix[k, : k + 1].mean()


def backward_transfer(matrix: Tensor, after_task: Optional[int] = None) -> Tensor:
    """``BWT_k = 1/k · Σ_{j<k} (R[k, j] − R[j, j])``: how later learning changed earlier tasks.

    Negative values are forgetting. ``nan`` after the first task (``k = 0``).
    """
    matrix, k = _checked(matrix, after_task)
    if k == 0:
        return _nan(matrix)
    earlier = torch.arange(k, device=matrix.device)
    return (matrix[k, :k] - matrix[earlier, earlier]).mean()


def forward_transfer(matrix: Tensor, initial: Tensor, after_task: Optional[int] = None) -> Tensor:
    """``FWT_k = 1/k · Σ_{1<=j<=k} (R[j−1, j] − b[j])``: what earlier tasks did for a task before it was learned.

    ``initial`` is ``b``, each task's accuracy at the random initialization. ``nan`` after the
    first task (``k = 0``).
    """
    matrix, k = _checked(matrix, after_task)
    if not isinstance(initial, Tensor) or initial.shape != (matrix.shape[0],):
        shape = tuple(initial.shape) if isinstance(initial, Tensor) else type(initial).__name__
        raise ValueError(f"initial must hold one accuracy per task, shape ({matrix.shape[0]},), got {shape}")
    if k == 0:
        return _nan(matrix)
    later = torch.arange(1, k + 1, device=matrix.device)
    return (matrix[later - 1, later] - initial.double()[later]).mean()


def forgetting(matrix: Tensor, after_task: Optional[int] = None) -> Tensor:
    """``F_k = 1/k · Σ_{j<k} (max_{l<k} R[l, j] − R[k, j])``: the best earlier accuracy minus the current one.

    Chaudhry et al. 2018, averaged over the tasks before ``k``. ``nan`` after the first task.
    """
    matrix, k = _checked(matrix, after_task)
    if k == 0:
        return _nan(matrix)
    best_before = matrix[:k, :k].max(dim=0).values
    return (best_before - matrix[k, :k]).mean()
