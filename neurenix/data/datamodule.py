"""A LightningDataModule over a sequence of tasks.

:class:`TaskSequenceDataModule` serves the current task's training (and validation) data and
one test loader per task, so every task's accuracy can be measured after each task;
:func:`neurenix.data.fit_sequence` trains the tasks one after the other with one ``Trainer``.
Its ``training`` option also serves the two usual baselines of a sequence from the same tasks:
cumulative training (task ``t`` trains on tasks ``0..t``) and joint training (one fit on all).
"""

from __future__ import annotations

from numbers import Integral
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import torch
from torch.utils.data import BatchSampler, ConcatDataset, DataLoader, Dataset, RandomSampler, SequentialSampler
from typing_extensions import override

from neurenix.continual._checks import check_int
from neurenix.continual.callback import continual_methods
from neurenix.continual.seen_classes import mark_seen_classes
from neurenix.data.tasks import (
    ConcatTaskDataset,
    TaskDataLoader,
    TaskDataset,
    TensorBatchSampler,
    _BatchedByIndex,
    collate_batch,
)

__all__ = ["TRAINING_REGIMES", "TaskSequenceDataModule"]

TRAINING_REGIMES = ("sequential", "cumulative", "joint")
"""The values of ``TaskSequenceDataModule(training=...)``."""


class TaskSequenceDataModule(pl.LightningDataModule):
    """Tasks one after the other for a Lightning ``Trainer``; the current task is its state.

    Any map-style datasets work as tasks; :class:`~neurenix.data.TaskDataset` tasks (what the
    benchmarks build) are batched by one tensor index per batch. The neurenix methods read the
    task id of a fit from :attr:`current_task`.

    **Training regimes.** ``training`` says what the fit of the current task ``t`` trains on:

    - ``"sequential"`` (the default): task ``t``'s own training data (continual learning);
    - ``"cumulative"``: tasks ``0..t``'s training data shuffled together (a
      :class:`~neurenix.data.ConcatTaskDataset`), the baseline that never loses its data;
    - ``"joint"``: every task's training data at once, in one fit (offline training, the usual
      upper bound). The data module then starts at the last task (``current_task = num_tasks - 1``),
      so :func:`~neurenix.data.fit_sequence` runs exactly one fit, and ``ForgettingCurves``
      fills the accuracy matrix's last row only: its average accuracy is that row's mean, and
      backward transfer and forgetting are NaN (there is no sequence to forget along).

    Each sample keeps its own task's id and transform, so a multi-head model trains on the union
    as it does on one task. Validation follows the training data: the current task's validation
    set for ``"sequential"``, the union of the validation sets of the tasks trained on for
    ``"cumulative"`` and ``"joint"``. Test loaders stay one per task, whatever the regime, and
    :meth:`task_train_dataloader` stays a task's own data. The regime travels in checkpoints: a
    checkpoint of one regime is refused by a data module of another.

    **Data on the device.** With ``keep_on_device=True`` the tasks' tensors (training,
    validation and test, every member of a union) are moved to the Trainer's root device when it
    sets the data module up (``setup``; under DDP each process to its own device, each holding
    every task), and every loader builds its batches there by indexing: no host-to-device copy
    and no host read per step. The order of an epoch is drawn as without the option (the same
    generator, on the CPU), copied to the device once per epoch and sliced, so the batches are
    the same, bit for bit; under DDP each process gets its ``DistributedSampler`` share as
    usual. The tasks given are left where they are (:attr:`train_tasks` and the others then hold
    the moved copies), and checkpoints hold no device tensor. Without a Trainer the tasks stay
    where they are and the loaders build batches where each task's tensors are (tasks moved with
    :meth:`TaskDataset.to <neurenix.data.TaskDataset.to>`). It needs every task to be a
    :class:`~neurenix.data.TaskDataset` (or :class:`~neurenix.data.ConcatTaskDataset`), batches
    built in this process (``num_workers=0``) and ``pin_memory=False``. See
    ``docs/device-data.md``.

    A model that ends in a :class:`~neurenix.continual.SeenClassMask` (class-incremental training
    over the classes seen so far) gets each task's classes marked as seen when its fit builds the
    training loader: the classes of the data the regime trains on (task ``t``'s, tasks ``0..t``'s
    or all).

    Attributes:
        current_task: the task that ``train_dataloader`` serves (an ``int``, from 0).
        tasks_seen: the tasks made current so far, in order (the current one included, so it
            starts as ``[0]``).
        task_start: the trainer's ``{"epoch": ..., "step": ...}`` when ``fit_sequence`` began the
            current task (checkpointed, so a resumed task keeps its length).
        num_classes: the benchmark's head size (``from_benchmark``), else ``None``.
        scenario: the benchmark's scenario (``from_benchmark``), else ``None``.

    Args:
        train_tasks: one training dataset per task (at least one task).
        test_tasks: one test dataset per task.
        val_tasks: one validation dataset per task, or ``None`` (no validation).
        batch_size: the training batch size.
        eval_batch_size: the batch size of validation and test loaders (default ``batch_size``).
        num_workers: ``DataLoader`` worker processes.
        shuffle: whether training batches are shuffled (through the loader's sampler, so
            Lightning's ``DistributedSampler`` replaces it under DDP).
        seed: the seed of the shuffling; the shuffling generator is saved in checkpoints, and
            the training loader's place in its epoch too (a :class:`~neurenix.data.TaskDataLoader`),
            so a run resumed from a checkpoint written anywhere sees the batches an uninterrupted
            one would. (Under DDP, Lightning's ``DistributedSampler`` shuffles instead, seeded from
            ``PL_GLOBAL_SEED``.)
        pin_memory: ``DataLoader``'s ``pin_memory``.
        training: ``"sequential"``, ``"cumulative"`` or ``"joint"`` (see above).
        keep_on_device: keep every task's tensors on the training device and build batches
            there (see above).

    Raises:
        TypeError: an argument has the wrong type; with ``keep_on_device=True``, a task that is
            not a ``TaskDataset`` or ``ConcatTaskDataset``.
        ValueError: no tasks, task lists of different lengths, an empty task, a bad count, a
            ``training`` that is not one of :data:`TRAINING_REGIMES`, or ``keep_on_device=True``
            with ``num_workers > 0`` or ``pin_memory=True``.

    Example::

        benchmark = split_benchmark("digits", num_tasks=5, scenario="class")
        datamodule = TaskSequenceDataModule.from_benchmark(benchmark, batch_size=64)
        trainer = L.Trainer(callbacks=[EWC(model)])
        fit_sequence(trainer, model, datamodule, epochs_per_task=2)
        trainer.test(model, datamodule=datamodule)   # one test loader (dataloader_idx) per task

        # the joint-training baseline of the same tasks: one fit on all of them
        joint = TaskSequenceDataModule.from_benchmark(benchmark, batch_size=64, training="joint")
    """

    def __init__(
        self,
        train_tasks: Sequence[Dataset],
        test_tasks: Sequence[Dataset],
        val_tasks: Optional[Sequence[Dataset]] = None,
        *,
        batch_size: int = 32,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        pin_memory: bool = False,
        training: str = "sequential",
        keep_on_device: bool = False,
    ) -> None:
        super().__init__()
        if training not in TRAINING_REGIMES:
            raise ValueError(f"training must be one of {', '.join(map(repr, TRAINING_REGIMES))}, got {training!r}")
        if not isinstance(keep_on_device, bool):
            raise TypeError(f"keep_on_device must be a bool, got {type(keep_on_device).__name__}: {keep_on_device!r:.80}")
        self.training = training
        self.train_tasks = _checked_tasks("train_tasks", train_tasks)
        self.test_tasks = _checked_tasks("test_tasks", test_tasks, len(self.train_tasks))
        self.val_tasks = None if val_tasks is None else _checked_tasks("val_tasks", val_tasks, len(self.train_tasks))
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.eval_batch_size = self.batch_size if eval_batch_size is None else check_int("eval_batch_size", eval_batch_size, minimum=1)
        self.num_workers = check_int("num_workers", num_workers, minimum=0)
        self.shuffle, self.pin_memory = bool(shuffle), bool(pin_memory)
        if keep_on_device:
            self._check_movable()
        self.keep_on_device = keep_on_device
        self._tasks_device: Optional[torch.device] = None  # where setup moved the tasks (keep_on_device)
        self.seed = check_int("seed", seed, minimum=0)
        # One generator for the whole sequence: its state is checkpointed with the current task.
        self._shuffle_generator = torch.Generator().manual_seed(self.seed)
        # Joint training is one fit, run as the last task's (see the class docstring).
        self.current_task = self.num_tasks - 1 if training == "joint" else 0
        self.tasks_seen: list[int] = [self.current_task]
        self.task_start: dict[str, int] = {"epoch": 0, "step": 0}  # where fit_sequence began the task
        self.num_classes: Optional[int] = None
        self.scenario: Optional[str] = None
        if self.val_tasks is None:
            # Lightning treats a data module whose `val_dataloader` is missing as one without
            # validation (no warning about a validation_step without data, or the reverse).
            self.val_dataloader = None  # type: ignore[assignment]

    @classmethod
    def from_benchmark(cls, benchmark: Any, **kwargs: Any) -> "TaskSequenceDataModule":
        """A data module over a benchmark's tasks (``split_benchmark``, ``permuted_benchmark``).

        Args:
            benchmark: an object with ``train`` and ``test`` task lists (a ``TaskSequence``).
            **kwargs: the keyword arguments of ``TaskSequenceDataModule``.

        Raises:
            TypeError: ``benchmark`` has no ``train``/``test`` task lists.
        """
        if not (hasattr(benchmark, "train") and hasattr(benchmark, "test")):
            raise TypeError(f"benchmark must have .train and .test task lists, got {type(benchmark).__name__}")
        datamodule = cls(benchmark.train, benchmark.test, **kwargs)
        datamodule.num_classes = getattr(benchmark, "num_classes", None)
        datamodule.scenario = getattr(benchmark, "scenario", None)
        return datamodule

    @property
    def num_tasks(self) -> int:
        return len(self.train_tasks)

    def _check_movable(self) -> None:
        """What ``keep_on_device=True`` needs, checked before any state is set."""
        if self.num_workers > 0:
            raise ValueError(
                f"keep_on_device=True builds every batch on the device, in this process, but num_workers={self.num_workers} "
                "would build them in worker processes on the host: use num_workers=0 with keep_on_device=True"
            )
        if self.pin_memory:
            raise ValueError(
                "keep_on_device=True builds every batch on the device, but pin_memory=True pins batches in host memory "
                "for a copy to the device: use pin_memory=False with keep_on_device=True"
            )
        for name, tasks in (("train_tasks", self.train_tasks), ("test_tasks", self.test_tasks), ("val_tasks", self.val_tasks)):
            for index, task in enumerate(tasks or []):
                if not isinstance(task, (TaskDataset, ConcatTaskDataset)):
                    raise TypeError(
                        f"keep_on_device=True needs every task to be a TaskDataset (or ConcatTaskDataset), tensors it can "
                        f"move to the device, got {name}[{index}]: {type(task).__name__}; build it as "
                        "TaskDataset(inputs, targets, task_id), or use keep_on_device=False"
                    )

    @override
    def setup(self, stage: str) -> None:
        """With ``keep_on_device=True``, every task's tensors to the Trainer's root device (once per device)."""
        if self.keep_on_device and self.trainer is not None:
            self._move_tasks(self.trainer.strategy.root_device)

    def _move_tasks(self, device: torch.device) -> None:
        """Every task (training, validation, test) replaced by its copy on ``device``; tasks sharing a
        transform (a split benchmark's) share its moved copy, so a union of them stays one batch."""
        if self._tasks_device == device:
            return
        memo: dict[int, Any] = {}  # see transform_to

        def moved(tasks: Optional[list]) -> Optional[list]:
            return None if tasks is None else [task._moved(device, memo) for task in tasks]

        self.train_tasks, self.test_tasks, self.val_tasks = moved(self.train_tasks), moved(self.test_tasks), moved(self.val_tasks)
        self._tasks_device = device

    def set_task(self, task: int) -> None:
        """Make ``task`` the current task (the one ``train_dataloader`` serves).

        Raises:
            TypeError: ``task`` is not an int.
            ValueError: ``task`` is not in ``0 .. num_tasks-1``.
        """
        self.current_task = self._checked_task(task)
        if self.current_task not in self.tasks_seen:
            self.tasks_seen.append(self.current_task)

    # ---------------------------------------------------------------------------- loaders
    @override
    def train_dataloader(self) -> DataLoader:
        generator = self._shuffle_generator if self.shuffle else None
        return self._loader(self._training_dataset(), self.batch_size, self.shuffle, generator)

    def _training_dataset(self) -> Dataset:
        """The current task's training data under the regime (its own, tasks ``0..t``, all), or the
        dataset a neurenix method on the fit's trainer serves in its place (``training_dataset``:
        GDumb's fit of a task trains on its memory)."""
        dataset = self._regime_dataset(self.train_tasks)
        if self.trainer is not None and self.trainer.lightning_module is not None:
            # The classes the fit trains on are marked as seen on the model's SeenClassMask (if it
            # has one) before a method may serve other data: GDumb's memory holds no new class.
            mark_seen_classes(self.trainer.lightning_module, dataset)
        for method in continual_methods(self.trainer):
            served = method.training_dataset(self.current_task, dataset)
            if served is not None:
                return served
        return dataset

    def task_train_dataloader(self, task: int) -> DataLoader:
        """Task ``task``'s own training data in order (not shuffled, ``eval_batch_size`` batches):
        for a method that reads a whole task (GDumb fills its memory from it).

        Raises:
            TypeError / ValueError: ``task`` is not one of the tasks.
        """
        return self._loader(self.train_tasks[self._checked_task(task)], self.eval_batch_size)

    @override
    def val_dataloader(self) -> DataLoader:
        """The validation loader of the data the current fit trains on: the current task's for
        ``"sequential"``, that of tasks ``0..t`` (``"cumulative"``) or all (``"joint"``) together.
        (``None`` in place of the method without ``val_tasks``.)"""
        return self._loader(self._regime_dataset(self.val_tasks), self.eval_batch_size)  # type: ignore[arg-type]

    def _regime_dataset(self, tasks: Sequence[Dataset]) -> Dataset:
        """What the current fit reads of ``tasks`` (one dataset per task) under :attr:`training`."""
        if self.training == "sequential":
            return tasks[self.current_task]
        last = self.current_task if self.training == "cumulative" else self.num_tasks - 1
        members = list(tasks[: last + 1])
        if len(members) == 1:
            return members[0]
        if all(isinstance(task, TaskDataset) for task in members):
            return ConcatTaskDataset(members)
        return ConcatDataset(members)  # other datasets: PyTorch's per-sample union

    @override
    def test_dataloader(self) -> list[DataLoader]:
        """One loader per task, all tasks (``dataloader_idx`` is the task id)."""
        return [self._loader(task, self.eval_batch_size) for task in self.test_tasks]

    def _loader(
        self, dataset: Dataset, batch_size: int, shuffle: bool = False, generator: Optional[torch.Generator] = None
    ) -> DataLoader:
        options = dict(num_workers=self.num_workers, pin_memory=self.pin_memory)
        # Every loader is a TaskDataLoader: Lightning saves and restores where a training epoch
        # stands through its `state_dict`, so a checkpoint written mid-epoch resumes exactly.
        if not isinstance(dataset, _BatchedByIndex):  # PyTorch's per-sample batching and collation
            return TaskDataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, **options)
        # A TaskDataset (or a union of them) builds a whole batch from one index tensor
        # (`__getitems__`), and TensorBatchSampler hands it one; the sampler inside stays a standard
        # one, so Lightning still swaps in its DistributedSampler under DDP (keeping `device`, an
        # argument it saves with the others). Worker processes get plain index lists: a tensor sent
        # to a worker travels through shared memory, which costs more than the list.
        sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
        if self.num_workers > 0:
            batches = BatchSampler(sampler, batch_size=batch_size, drop_last=False)
        else:
            device = dataset.device if self.keep_on_device else None  # type: ignore[attr-defined]
            batches = TensorBatchSampler(sampler, batch_size=batch_size, drop_last=False, device=device)
        return TaskDataLoader(dataset, batch_sampler=batches, collate_fn=collate_batch, **options)

    # ---------------------------------------------------------------------------- checkpoints
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "training": self.training,
            "current_task": self.current_task,
            "tasks_seen": list(self.tasks_seen),
            "task_start": dict(self.task_start),
            "shuffle_generator": self._shuffle_generator.get_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s state.

        Raises:
            ValueError: the state is of another training regime (a checkpoint of a joint run
                cannot resume a sequential one), or names a task this data module does not have.
        """
        training = state_dict.get("training", "sequential")  # checkpoints from before the option: sequential
        if training != self.training:
            raise ValueError(
                f"the checkpoint was written with TaskSequenceDataModule(training={training!r}), but this data module "
                f"has training={self.training!r}: resume it with training={training!r}, or start the "
                f"{self.training!r} run afresh"
            )
        self._checked_task(state_dict["current_task"])
        self.current_task = self._checked_task(state_dict["current_task"])
        self.tasks_seen = [int(task) for task in state_dict.get("tasks_seen", range(self.current_task + 1))]
        self.task_start = dict(state_dict.get("task_start", {"epoch": 0, "step": 0}))
        if "shuffle_generator" in state_dict:
            self._shuffle_generator.set_state(state_dict["shuffle_generator"].cpu())

    def _checked_task(self, task: object) -> int:
        if isinstance(task, bool) or not isinstance(task, Integral):
            raise TypeError(f"task must be an int, got {type(task).__name__}: {task!r}")
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task must be in 0..{self.num_tasks - 1} ({self.num_tasks} tasks), got {task!r}")
        return int(task)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_tasks={self.num_tasks}, current_task={self.current_task}, "
            f"batch_size={self.batch_size}, training={self.training!r})"
        )


def _checked_tasks(name: str, tasks: object, expected: Optional[int] = None) -> list:
    if isinstance(tasks, (str, bytes, Dataset)) or not isinstance(tasks, Sequence):
        raise TypeError(f"{name} must be a list of datasets, one per task, got {type(tasks).__name__}: {tasks!r:.80}")
    tasks = list(tasks)
    if not tasks:
        raise ValueError(f"{name} must hold at least one task, got {tasks!r}")
    if expected is not None and len(tasks) != expected:
        raise ValueError(f"{name} must hold one dataset per training task ({expected}), got {len(tasks)}")
    for index, task in enumerate(tasks):
        if not (hasattr(task, "__getitem__") and hasattr(task, "__len__")):
            raise TypeError(f"{name}[{index}] must be a map-style dataset, got {type(task).__name__}")
        if len(task) == 0:
            raise ValueError(f"{name}[{index}] is empty")
    return tasks
