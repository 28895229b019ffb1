"""A task-free stream: a benchmark's tasks one after the other, with the boundaries hidden.

Task-free (or task-agnostic) continual learning (Aljundi et al. 2019, "Task-Free Continual
Learning") trains on one stream of batches that never says where a task ends. A
:class:`TaskStream` is built from any :class:`~neurenix.data.TaskSequence` (split or permuted, in
the domain- or class-incremental scenario): each task's training samples, shuffled, for
``passes`` passes, then the next task's, in one fixed order. Its batches are ``(inputs,
targets)`` only: no task ids, so nothing in the data marks a boundary. The boundaries are known
to the stream (:attr:`TaskStream.boundaries`, in batches) for tests and for plotting, never to
the model.

Every task's part of the stream is cut to whole batches, so that each batch belongs to one task
and a boundary falls between two batches. Under DDP, build the stream with the *global* batch
size, give each process ``global // world_size`` (:meth:`TaskStream.train_dataloader`) and pass
``Trainer(use_distributed_sampler=False)``: Lightning's own ``DistributedSampler`` always
shuffles training data, which would mix the tasks and hide the boundaries, while the stream's
:class:`StreamSampler` deals each global batch out to the processes in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from neurenix.continual._checks import check_int
from neurenix.continual.distributed import rank_and_world_size
from neurenix.data.benchmarks import TaskSequence
from neurenix.data.tasks import SampleBatch, TaskDataLoader, TaskDataset, collate_batch

__all__ = ["StreamDataset", "StreamSampler", "TaskStream", "task_free_stream"]


class StreamDataset(Dataset):
    """The samples of several tasks in one fixed order, as ``(inputs, targets)`` without task ids.

    Sample ``i`` of the stream is sample ``order[i, 1]`` of task ``order[i, 0]``; a batch of
    indices is built with one index per task it touches (each task keeps its own transform, e.g.
    a permuted task its pixel permutation).

    Args:
        tasks: the tasks' datasets.
        order: ``(N, 2)`` integer tensor of ``(task, index within the task)``.
    """

    def __init__(self, tasks: Sequence[TaskDataset], order: Tensor) -> None:
        if order.dim() != 2 or order.shape[1] != 2 or order.is_floating_point():
            raise ValueError(f"order must be an (N, 2) integer tensor of (task, index), got shape {tuple(order.shape)}")
        self.tasks = list(tasks)
        self.order = order.long()

    def __len__(self) -> int:
        return self.order.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        inputs, targets = self._batch([index])
        return inputs[0], targets[0]

    def __getitems__(self, indices: Union[Sequence[int], Tensor]) -> SampleBatch:
        """The batch of stream positions ``indices`` (what ``DataLoader`` asks for)."""
        return SampleBatch(self._batch(indices))

    def _batch(self, indices: Union[Sequence[int], Tensor]) -> tuple[Tensor, Tensor]:
        entries = self.order[torch.as_tensor(indices, dtype=torch.long)]
        task_of = entries[:, 0]
        parts = []
        for task in torch.unique(task_of).tolist():
            where = torch.nonzero(task_of == task).squeeze(1)
            inputs, targets = self.tasks[task][entries[where, 1]][:2]  # no task ids
            parts.append((where, inputs, targets))
        if len(parts) == 1:
            return parts[0][1], parts[0][2]
        where = torch.cat([part[0] for part in parts])
        inverse = torch.empty_like(where)
        inverse[where] = torch.arange(where.shape[0])
        return torch.cat([part[1] for part in parts])[inverse], torch.cat([part[2] for part in parts])[inverse]


class StreamSampler(Sampler[int]):
    """The stream's positions in order; under DDP each process takes its share of every global batch.

    Process ``r`` of ``W`` takes positions ``r, r + W, r + 2W, ...`` (what ``DistributedSampler``
    does without shuffling), so its ``i``-th batch of ``B`` holds its part of the stream's ``i``-th
    global batch of ``W·B``. The process group is read when iteration begins, so one loader
    serves a single process and a DDP job alike.

    Args:
        length: the stream's length (a multiple of the global batch keeps the processes' batches
            aligned; the last ``length mod W`` positions are left out so that every process takes
            as many).
    """

    def __init__(self, length: int) -> None:
        self.length = check_int("length", length, minimum=0)

    def __iter__(self):
        rank, world_size = rank_and_world_size()
        return iter(range(rank, self.length - self.length % world_size, world_size))

    def __len__(self) -> int:
        return self.length // rank_and_world_size()[1]


@dataclass
class TaskStream:
    """A task-free training stream over a benchmark's tasks, and each task's test data.

    Attributes:
        train: the stream, in training order (do not shuffle it: the order *is* the stream).
        test: one test :class:`~neurenix.data.TaskDataset` per task (for evaluation only).
        boundaries: the batch (step) at which each task after the first begins.
        task_steps: the number of batches of each task.
        batch_size: the (global) batch size the stream was cut for.
        benchmark: the :class:`~neurenix.data.TaskSequence` it was built from.
    """

    train: StreamDataset
    test: list[TaskDataset]
    boundaries: list[int]
    task_steps: list[int]
    batch_size: int
    benchmark: TaskSequence

    @property
    def num_steps(self) -> int:
        """Batches in the whole stream."""
        return sum(self.task_steps)

    @property
    def num_tasks(self) -> int:
        return len(self.task_steps)

    @property
    def num_classes(self) -> int:
        """Output units the scenario needs (see :class:`~neurenix.data.TaskSequence`)."""
        return self.benchmark.num_classes

    def task_of_step(self, step: int) -> int:
        """The task that batch ``step`` (0-based) belongs to."""
        if not 0 <= step < self.num_steps:
            raise ValueError(f"step must be in [0, {self.num_steps - 1}], got {step!r}")
        return sum(boundary <= step for boundary in self.boundaries)

    def train_dataloader(self, batch_size: Optional[int] = None) -> DataLoader:
        """The stream in order: ``(inputs, targets)`` batches of ``batch_size`` (default: the
        stream's). Under DDP pass ``batch_size=global // world_size`` and
        ``Trainer(use_distributed_sampler=False)`` (see :class:`StreamSampler`)."""
        size = self.batch_size if batch_size is None else check_int("batch_size", batch_size, minimum=1)
        # A TaskDataLoader saves how far the stream got: a checkpoint written in the middle of the
        # stream (it is one long epoch) resumes at its next batch, not at the stream's start.
        return TaskDataLoader(self.train, batch_size=size, sampler=StreamSampler(len(self.train)), collate_fn=collate_batch)


def task_free_stream(benchmark: TaskSequence, *, batch_size: int = 32, passes: int = 1, seed: int = 0) -> TaskStream:
    """The tasks of ``benchmark`` as one stream without task labels.

    Each task contributes ``passes`` passes over its training samples, each pass in its own
    random order (``seed``), cut to whole batches (the last ``len(task)·passes mod batch_size``
    samples of a task are left out); then the next task follows.

    Args:
        benchmark: from :func:`~neurenix.data.split_benchmark` or
            :func:`~neurenix.data.permuted_benchmark`, scenario ``"domain"`` or ``"class"``.
        batch_size: samples per batch (the global batch under DDP), ``>= 1``.
        passes: passes over each task's samples before the next task, ``>= 1``.
        seed: the seed of the order within each task.

    Returns:
        The :class:`TaskStream`.

    Raises:
        TypeError: an argument of the wrong type.
        ValueError: a task-incremental benchmark (a task-free stream has no task ids to give a
            multi-head model), or a task with fewer samples than one batch.

    Example::

        stream = task_free_stream(split_benchmark("digits", 5, scenario="domain"), passes=4)
        trainer.fit(model, stream.train_dataloader())     # one fit over every task
        stream.boundaries                                 # [36, 72, 108, 144]: hidden from the model
    """
    if not isinstance(benchmark, TaskSequence):
        raise TypeError(f"benchmark must be a TaskSequence (split_benchmark, permuted_benchmark), got {type(benchmark).__name__}")
    if benchmark.scenario == "task":
        raise ValueError(
            "a task-free stream has no task ids, which a task-incremental (multi-head) benchmark needs; "
            "build the benchmark with scenario='domain' or scenario='class'"
        )
    batch_size = check_int("batch_size", batch_size, minimum=1)
    passes = check_int("passes", passes, minimum=1)
    seed = check_int("seed", seed, minimum=0)
    generator = torch.Generator().manual_seed(seed)
    orders, task_steps = [], []
    for task, dataset in enumerate(benchmark.train):
        indices = torch.cat([torch.randperm(len(dataset), generator=generator) for _ in range(passes)])
        steps = indices.shape[0] // batch_size
        if steps == 0:
            raise ValueError(
                f"task {task} has {len(dataset)} training samples: {passes} pass(es) give fewer than one "
                f"batch of {batch_size}"
            )
        indices = indices[: steps * batch_size]
        orders.append(torch.stack([torch.full_like(indices, task), indices], 1))
        task_steps.append(steps)
    boundaries = [sum(task_steps[:task]) for task in range(1, len(task_steps))]
    stream = StreamDataset(benchmark.train, torch.cat(orders))
    return TaskStream(stream, list(benchmark.test), boundaries, task_steps, batch_size, benchmark)
