"""Standard continual-learning benchmarks: split and permuted, in the three scenarios.

A benchmark is a sequence of tasks built from one labelled source (scikit-learn's digits,
MNIST, Fashion-MNIST, or any ``(train, test)`` pair exposing ``.data`` and ``.targets``):

- :func:`split_benchmark`: the classes are cut into groups, one group per task (split MNIST);
- :func:`permuted_benchmark`: every task has all classes, under its own fixed pixel
  permutation (permuted MNIST).

The scenario (van de Ven & Tolias 2019, "Three scenarios for continual learning") decides what
a model is told and which labels it predicts; the same benchmark works in all three:

============  ===============================  ==========================  =====================
scenario      split labels                     permuted labels             batches
============  ===============================  ==========================  =====================
``"task"``    position within the task, 0..k-1 original label, 0..C-1     ``(x, y, task_ids)``
``"domain"``  position within the task, 0..k-1 original label, 0..C-1     ``(x, y)``
``"class"``   position in ``class_order``      ``task · C + label``        ``(x, y)``
============  ===============================  ==========================  =====================

``num_classes`` is the head size the scenario needs: ``k`` (the largest group) for split
task/domain, ``len(class_order)`` for split class, ``C`` for permuted task/domain and ``T · C``
for permuted class. In split class-incremental runs the labels are positions in
``class_order``, not the original class ids, so the classes seen after ``t`` tasks are always
the first output units (``0 .. seen-1``): a model masks or grows its single head by a prefix.
``TaskSequence.class_order[label]`` gives the original class back.

Inputs are stored as the source stores them (``uint8`` images stay ``uint8``) and turned into
``float32`` in ``[0, 1]`` per batch; ``flatten=True`` gives vectors ``(B, H·W)``,
``flatten=False`` images ``(B, 1, H, W)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from numbers import Integral
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from neurenix.continual._checks import check_int
from neurenix.data.tasks import AddChannel, Compose, Flatten, PermutePixels, TaskDataset, ToFloat, _checked_device

__all__ = ["SCENARIOS", "SOURCES", "TaskSequence", "permuted_benchmark", "split_benchmark"]

#: Scenario names: task-, domain- and class-incremental.
SCENARIOS = ("task", "domain", "class")
#: Sources that benchmarks load by name.
SOURCES = ("digits", "mnist", "fashion_mnist")

Source = Union[str, tuple[Any, Any], list[Any]]


@dataclass
class TaskSequence:
    """The tasks of a benchmark, ready for :class:`~neurenix.data.TaskSequenceDataModule`.

    Attributes:
        train: one training :class:`TaskDataset` per task.
        test: one test :class:`TaskDataset` per task.
        scenario: ``"task"``, ``"domain"`` or ``"class"``.
        num_classes: the output units the scenario needs (per head in task-incremental runs).
        class_order: the source's classes in the order the tasks use them (split: task 0's
            classes first; permuted: sorted).
        task_classes: the source's classes in each task.
        permutations: each task's pixel permutation (permuted benchmarks), else ``None``.
        metadata: how the benchmark was built (``benchmark``, ``source``, ``seed``, ...).
    """

    train: list[TaskDataset]
    test: list[TaskDataset]
    scenario: str
    num_classes: int
    class_order: list[int]
    task_classes: list[list[int]]
    permutations: Optional[list[Tensor]] = None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tasks(self) -> int:
        return len(self.train)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input as the model receives it."""
        return tuple(self.train[0][0][0].shape)

    def __len__(self) -> int:
        return self.num_tasks

    def to(self, device: Union[str, int, torch.device]) -> "TaskSequence":
        """A copy of the sequence whose tasks (and permutations) are on ``device``.

        Every task is moved as :meth:`TaskDataset.to <neurenix.data.TaskDataset.to>` moves it; the
        tasks sharing one transform (a split benchmark's) share its moved copy, so a union of
        them (:class:`~neurenix.data.ConcatTaskDataset`) is still transformed as one batch. For
        loops of your own; under a Trainer, ``TaskSequenceDataModule(..., keep_on_device=True)``
        moves the tasks itself.

        Raises:
            TypeError / ValueError: ``device`` is not a device.

        Example::

            benchmark = split_benchmark("mnist", root="data").to("cuda")
            x, y = benchmark.train[0][torch.arange(128, device="cuda")]   # built on the GPU
        """
        device = _checked_device(device)
        memo: dict[int, Any] = {}  # one moved copy of each transform, whichever tasks share it
        return replace(
            self,
            train=[task._moved(device, memo) for task in self.train],
            test=[task._moved(device, memo) for task in self.test],
            permutations=None if self.permutations is None else [p.to(device) for p in self.permutations],
            metadata=dict(self.metadata),
        )


@dataclass
class _Source:
    name: str
    train_inputs: Tensor
    train_targets: Tensor
    test_inputs: Tensor
    test_targets: Tensor

    @property
    def classes(self) -> list[int]:
        return torch.unique(self.train_targets).tolist()


# ---------------------------------------------------------------------------- split
def split_benchmark(
    source: Source,
    num_tasks: int = 5,
    *,
    classes_per_task: Union[None, int, Sequence[int]] = None,
    class_order: Optional[Sequence[int]] = None,
    seed: int = 0,
    scenario: str = "class",
    flatten: bool = True,
    root: Any = None,
    download: bool = False,
) -> TaskSequence:
    """Class groups, one per task, in the chosen scenario (split MNIST and the like).

    Args:
        source: ``"digits"``, ``"mnist"``, ``"fashion_mnist"``, or a ``(train, test)`` pair of
            objects exposing ``.data`` (inputs) and ``.targets`` (integer labels).
        num_tasks: the number of tasks, ``>= 1``.
        classes_per_task: classes in each task: an int, one int per task, or ``None`` for an
            equal share (``len(class_order) // num_tasks``, which must divide exactly). When
            given, only the first ``sum`` classes of ``class_order`` are used.
        class_order: the classes in the order tasks take them; ``None`` draws a permutation of
            all classes from ``seed``. A class may appear once only.
        seed: the seed of the class order.
        scenario: ``"task"``, ``"domain"`` or ``"class"`` (labels: see the module docstring).
        flatten: inputs as vectors (``True``) or as ``(1, H, W)`` images.
        root: where ``"mnist"``/``"fashion_mnist"`` are stored (unused for ``"digits"``).
        download: whether MNIST-style sources may be downloaded into ``root``.

    Returns:
        The :class:`TaskSequence`.

    Raises:
        TypeError: ``num_tasks``, ``classes_per_task`` or ``seed`` is not an int.
        ValueError: an unknown ``scenario`` or ``source``, ``num_tasks < 1``, a class listed
            twice or absent from the data, or class counts that do not fit.

    Example::

        benchmark = split_benchmark("digits", num_tasks=5, scenario="task", seed=1)
        benchmark.task_classes      # [[5, 6], [1, 2], [0, 8], [9, 3], [7, 4]]
    """
    scenario = _check_scenario(scenario)
    num_tasks = check_int("num_tasks", num_tasks, minimum=1)
    seed = _check_seed(seed)
    data = _load_source(source, root=root, download=download)
    order = _class_order(class_order, data.classes, seed)
    groups = _class_groups(order, num_tasks, classes_per_task)
    transform = _input_transform(data.train_inputs, None, flatten)
    train, test = [], []
    for task, group in enumerate(groups):
        labels = _split_labels(group, order, scenario)
        train.append(_class_subset(data.train_inputs, data.train_targets, task, group, labels, transform, scenario, "train"))
        test.append(_class_subset(data.test_inputs, data.test_targets, task, group, labels, transform, scenario, "test"))
    used = [c for group in groups for c in group]
    num_classes = len(used) if scenario == "class" else max(len(group) for group in groups)
    metadata = dict(benchmark="split", source=data.name, seed=seed, flatten=flatten)
    return TaskSequence(train, test, scenario, num_classes, used, groups, None, metadata)


def _class_order(class_order: Optional[Sequence[int]], classes: list[int], seed: int) -> list[int]:
    if class_order is None:
        generator = torch.Generator().manual_seed(seed)
        return [classes[i] for i in torch.randperm(len(classes), generator=generator).tolist()]
    order = [int(c) for c in (class_order.tolist() if isinstance(class_order, Tensor) else class_order)]
    seen: set[int] = set()
    for c in order:
        if c in seen:
            raise ValueError(
                f"class_order lists class {c} twice ({order}): a class belongs to exactly one task of a split"
            )
        if c not in classes:
            raise ValueError(f"class_order contains {c}, which is not a class of the data (classes: {classes})")
        seen.add(c)
    return order


def _class_groups(order: list[int], num_tasks: int, classes_per_task: Union[None, int, Sequence[int]]) -> list[list[int]]:
    if classes_per_task is None:
        if len(order) % num_tasks:
            raise ValueError(
                f"num_tasks={num_tasks} does not divide the {len(order)} classes equally; "
                "pass classes_per_task (an int or one int per task)"
            )
        sizes = [len(order) // num_tasks] * num_tasks
    elif isinstance(classes_per_task, Integral) and not isinstance(classes_per_task, bool):
        sizes = [check_int("classes_per_task", classes_per_task, minimum=1)] * num_tasks
    else:
        sizes = [check_int("classes_per_task", size, minimum=1) for size in classes_per_task]
        if len(sizes) != num_tasks:
            raise ValueError(f"classes_per_task must give one size per task ({num_tasks}), got {list(classes_per_task)}")
    if sum(sizes) > len(order):
        raise ValueError(
            f"classes_per_task={classes_per_task!r} asks for {sum(sizes)} classes over {num_tasks} tasks, "
            f"but there are {len(order)}"
        )
    starts = [sum(sizes[:task]) for task in range(num_tasks)]
    return [order[start : start + size] for start, size in zip(starts, sizes)]


def _split_labels(group: list[int], order: list[int], scenario: str) -> list[int]:
    """The label each class of ``group`` gets in ``scenario``."""
    if scenario == "class":
        return [order.index(c) for c in group]
    return list(range(len(group)))


def _class_subset(
    inputs: Tensor, targets: Tensor, task: int, group: list[int], labels: list[int],
    transform: Callable[[Tensor], Tensor], scenario: str, part: str,
) -> TaskDataset:
    group_tensor = torch.tensor(group)
    keep = torch.isin(targets, group_tensor)
    if not keep.any():
        raise ValueError(f"the {part} data has no sample of task {task}'s classes {group}")
    # Relabel by lookup: each kept target's place in the sorted group picks its new label.
    sorter = group_tensor.argsort()
    place = torch.searchsorted(group_tensor[sorter], targets[keep])
    new_labels = torch.tensor(labels)[sorter][place]
    return TaskDataset(inputs[keep], new_labels, task, transform=transform, with_task_ids=scenario == "task")


# ---------------------------------------------------------------------------- permuted
def permuted_benchmark(
    source: Source,
    num_tasks: int = 10,
    *,
    seed: int = 0,
    scenario: str = "domain",
    first_unpermuted: bool = True,
    flatten: bool = True,
    root: Any = None,
    download: bool = False,
) -> TaskSequence:
    """All classes in every task, each task under its own fixed pixel permutation.

    The permutations are drawn from ``seed``, one per task (task 0's too, so that
    ``first_unpermuted`` changes task 0 only); a task's train and test data share its
    permutation. The tasks share the source's input tensors: the permutation is applied per
    batch, so ``T`` tasks cost no more memory than one.

    Args:
        source: ``"digits"``, ``"mnist"``, ``"fashion_mnist"``, or a ``(train, test)`` pair of
            objects exposing ``.data`` and ``.targets``.
        num_tasks: the number of tasks, ``>= 1``.
        seed: the seed of the permutations.
        scenario: ``"task"``, ``"domain"`` or ``"class"`` (labels: see the module docstring).
        first_unpermuted: task 0 sees the original images.
        flatten: inputs as vectors (``True``) or as ``(1, H, W)`` images.
        root: where ``"mnist"``/``"fashion_mnist"`` are stored (unused for ``"digits"``).
        download: whether MNIST-style sources may be downloaded into ``root``.

    Returns:
        The :class:`TaskSequence`.

    Raises:
        TypeError: ``num_tasks`` or ``seed`` is not an int.
        ValueError: an unknown ``scenario`` or ``source``, or ``num_tasks < 1``.
    """
    scenario = _check_scenario(scenario)
    num_tasks = check_int("num_tasks", num_tasks, minimum=1)
    seed = _check_seed(seed)
    data = _load_source(source, root=root, download=download)
    classes = data.classes
    features = data.train_inputs[0].numel()
    generator = torch.Generator().manual_seed(seed)
    permutations = [torch.randperm(features, generator=generator) for _ in range(num_tasks)]
    if first_unpermuted:
        permutations[0] = torch.arange(features)
    train_index = _class_index(data.train_targets, classes, "train")
    test_index = _class_index(data.test_targets, classes, "test")
    train, test = [], []
    for task, permutation in enumerate(permutations):
        transform = _input_transform(data.train_inputs, permutation, flatten)
        offset = task * len(classes) if scenario == "class" else 0  # class-IL: task · C + label
        for part, inputs, index in ((train, data.train_inputs, train_index), (test, data.test_inputs, test_index)):
            part.append(TaskDataset(inputs, index + offset, task, transform=transform, with_task_ids=scenario == "task"))
    num_classes = len(classes) * (num_tasks if scenario == "class" else 1)
    metadata = dict(benchmark="permuted", source=data.name, seed=seed, flatten=flatten, first_unpermuted=first_unpermuted)
    return TaskSequence(train, test, scenario, num_classes, classes, [list(classes)] * num_tasks, permutations, metadata)


def _class_index(targets: Tensor, classes: list[int], part: str) -> Tensor:
    """Each label's position among the sorted classes (the label itself for 0..C-1 data)."""
    index = torch.searchsorted(torch.tensor(classes), targets)
    if not torch.equal(torch.tensor(classes)[index.clamp(max=len(classes) - 1)], targets):
        raise ValueError(f"the {part} data has labels that the train data lacks (train classes: {classes})")
    return index


# ---------------------------------------------------------------------------- shared
def _input_transform(inputs: Tensor, permutation: Optional[Tensor], flatten: bool) -> Callable[[Tensor], Tensor]:
    steps: list[Callable[[Tensor], Tensor]] = []
    if permutation is not None:
        steps.append(PermutePixels(permutation))  # before the conversion: moving bytes is cheaper
    if inputs.dtype == torch.uint8:
        steps.append(ToFloat(1.0 / 255.0))  # 8-bit pixels, as MNIST and Digits store them
    elif not inputs.is_floating_point():
        steps.append(ToFloat(1.0))
    if flatten:
        steps.append(Flatten())
    elif inputs.dim() == 3:  # (N, H, W) images get the channel a convolution expects
        steps.append(AddChannel())
    return Compose(*steps)


def _load_source(source: Source, *, root: Any, download: bool) -> _Source:
    if isinstance(source, str):
        if source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(map(repr, SOURCES))} or a (train, test) pair; got {source!r}")
        train, test = _named_datasets(source, root, download)
        name = source
    elif isinstance(source, (tuple, list)) and len(source) == 2:
        train, test = source
        name = type(train).__name__
    else:
        raise ValueError(
            f"source must be one of {', '.join(map(repr, SOURCES))} or a (train, test) pair of objects with "
            f".data and .targets; got {type(source).__name__}: {source!r:.80}"
        )
    return _Source(name, *_tensors_of(train, "train"), *_tensors_of(test, "test"))


def _named_datasets(source: str, root: Any, download: bool) -> tuple[Any, Any]:
    if source == "digits":
        from neurenix.data.digits import Digits

        return Digits(train=True), Digits(train=False)
    if root is None:
        raise ValueError(f"root must name the folder that holds (or will hold) {source!r}, got None")
    # Imported here: MNIST's reader is only needed by the runs that use it.
    from neurenix.data import mnist

    cls = mnist.MNIST if source == "mnist" else mnist.FashionMNIST
    return cls(root, train=True, download=download), cls(root, train=False, download=download)


def _tensors_of(dataset: Any, part: str) -> tuple[Tensor, Tensor]:
    if not (hasattr(dataset, "data") and hasattr(dataset, "targets")):
        raise ValueError(f"the {part} part of source must expose .data and .targets, got {type(dataset).__name__}")
    inputs = torch.as_tensor(dataset.data)
    targets = torch.as_tensor(dataset.targets)
    if inputs.dim() < 2 or targets.dim() != 1 or inputs.shape[0] != targets.shape[0] or inputs.shape[0] == 0:
        raise ValueError(
            f"the {part} part of source must hold (N, ...) inputs and N labels, N > 0; got .data of shape "
            f"{tuple(inputs.shape)} and .targets of shape {tuple(targets.shape)}"
        )
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise ValueError(f"the {part} part of source must have integer .targets, got dtype {targets.dtype}")
    return inputs, targets.long()


def _check_scenario(scenario: object) -> str:
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {', '.join(map(repr, SCENARIOS))}; got {scenario!r}")
    return scenario  # type: ignore[return-value]


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}: {seed!r}")
    return int(seed)
