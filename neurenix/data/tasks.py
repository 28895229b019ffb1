"""One task of a continual-learning sequence, held as tensors in memory.

A :class:`TaskDataset` keeps a task's inputs (``uint8`` where the source is ``uint8``, so that
MNIST-sized tasks stay small) and ``int64`` targets, and builds a whole batch with one tensor
index: ``DataLoader`` asks for a batch through ``__getitems__`` and :func:`collate_batch` passes it
through. Per-sample Python objects, and the stacking of them, are what makes a plain
``TensorDataset`` loader slow on small inputs.

The batch transforms here (:class:`ToFloat`, :class:`Flatten`, :class:`AddChannel`,
:class:`PermutePixels`, :class:`Compose`) work on whole batches, so converting ``uint8`` to
floats or permuting pixels costs a few vectorized operations per batch. They are module-level
classes so that datasets pickle into ``DataLoader`` worker processes.
"""

from __future__ import annotations

from numbers import Integral
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

__all__ = [
    "AddChannel",
    "Compose",
    "Flatten",
    "PermutePixels",
    "TaskDataLoader",
    "TaskDataset",
    "TensorBatchSampler",
    "ToFloat",
    "collate_batch",
]

Index = Union[int, slice, Sequence[int], Tensor]
Batch = Union[tuple[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]


def collate_batch(batch: Batch) -> Batch:
    """``collate_fn`` for a :class:`TaskDataset`: ``__getitems__`` already built the batch."""
    return batch


class TensorBatchSampler(BatchSampler):
    """PyTorch's ``BatchSampler``, yielding each batch of indices as one tensor where it can.

    ``BatchSampler`` over a ``RandomSampler`` turns a permutation into one Python int per
    sample, then a list per batch: over a 60,000-sample MNIST-shaped task that adds about half
    the time that building the batches takes (``benchmarks/datamodule_epoch.py``). Over a plain ``RandomSampler`` (no replacement, one pass) or a
    ``SequentialSampler`` this class slices one index tensor instead; the permutation is drawn
    from the sampler's own generator (or, without one, seeded from PyTorch's global generator as
    ``RandomSampler`` does). Any other sampler (Lightning's ``DistributedSampler``, which it
    injects through this class's ``(sampler, batch_size, drop_last)`` signature) is batched
    exactly as ``BatchSampler`` does. With ``DataLoader`` worker processes prefer
    ``BatchSampler``: a tensor sent to a worker travels through shared memory, a list does not.
    """

    def __iter__(self) -> Iterator[Union[list[int], Tensor]]:
        order = self._order()
        if order is None:
            yield from super().__iter__()
            return
        stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        for start in range(0, stop, self.batch_size):
            yield order[start : start + self.batch_size]

    def _order(self) -> Optional[Tensor]:
        """The whole epoch's indices as a tensor, or ``None`` for samplers batched one by one."""
        sampler = self.sampler
        if type(sampler) is SequentialSampler:
            return torch.arange(len(sampler.data_source))
        if type(sampler) is RandomSampler and not sampler.replacement and sampler.num_samples == len(sampler.data_source):
            generator = sampler.generator
            if generator is None:
                seed = int(torch.empty((), dtype=torch.int64).random_().item())
                generator = torch.Generator().manual_seed(seed)
            return torch.randperm(len(sampler.data_source), generator=generator)
        return None


class TaskDataLoader(DataLoader):
    """A ``DataLoader`` that, in the main process, hands each batch of indices straight to the dataset.

    ``DataLoader``'s single-process iterator passes every batch through a fetcher, a profiler
    record and checks that matter for per-sample datasets; over a :class:`TaskDataset`, which
    builds a whole batch from one index tensor, that machinery costs about a quarter of the
    batch's time at batch size 32 (``benchmarks/datamodule_epoch.py``). Without worker
    processes and pinned memory this class iterates its batch sampler and calls the dataset's
    ``__getitems__`` and the ``collate_fn`` itself: the same batches, in the same order. With
    workers or ``pin_memory=True`` it is a plain ``DataLoader``. Its constructor is
    ``DataLoader``'s, so Lightning can rebuild it with a ``DistributedSampler`` under DDP.
    """

    def __iter__(self) -> Iterator[Any]:
        if self.num_workers > 0 or self.pin_memory or not hasattr(self.dataset, "__getitems__") or self.batch_sampler is None:
            return super().__iter__()
        return self._batches()

    def _batches(self) -> Iterator[Any]:
        dataset, collate = self.dataset, self.collate_fn
        for indices in self.batch_sampler:  # type: ignore[union-attr]
            yield collate(dataset.__getitems__(indices))  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------- batch transforms
class ToFloat:
    """Inputs as floating point, multiplied by ``scale`` (``uint8`` pixels to ``[0, 1]`` by default).

    Args:
        scale: the factor applied after the conversion.
        dtype: the floating-point type of the result.
    """

    def __init__(self, scale: float = 1.0 / 255.0, dtype: torch.dtype = torch.float32) -> None:
        self.scale = float(scale)
        self.dtype = dtype

    def __call__(self, x: Tensor) -> Tensor:
        if x.dtype == self.dtype:
            return x * self.scale  # a new tensor: the stored data is never scaled in place
        return x.to(self.dtype).mul_(self.scale)  # `to` made a copy, so scaling it in place is safe

    def __repr__(self) -> str:
        return f"ToFloat(scale={self.scale!r}, dtype={self.dtype})"


class Flatten:
    """Each sample as a vector: ``(B, *shape)`` to ``(B, prod(shape))``."""

    def __call__(self, x: Tensor) -> Tensor:
        return x.flatten(1)

    def __repr__(self) -> str:
        return "Flatten()"


class AddChannel:
    """A channel dimension for convolutional models: ``(B, H, W)`` to ``(B, 1, H, W)``."""

    def __call__(self, x: Tensor) -> Tensor:
        return x.unsqueeze(1)

    def __repr__(self) -> str:
        return "AddChannel()"


class PermutePixels:
    """The same fixed permutation of the features of every sample (permuted MNIST).

    The features are the flattened sample; the result keeps the batch's shape.

    Args:
        permutation: a permutation of ``0 .. features-1`` (a 1-D integer tensor).
    """

    def __init__(self, permutation: Tensor) -> None:
        permutation = torch.as_tensor(permutation)
        if permutation.dim() != 1 or not torch.equal(permutation.sort().values, torch.arange(len(permutation))):
            raise ValueError(f"permutation must be a permutation of 0..n-1, got {permutation!r:.120}")
        self.permutation = permutation.long()

    def __call__(self, x: Tensor) -> Tensor:
        return x.flatten(1)[:, self.permutation.to(x.device)].reshape(x.shape)

    def __repr__(self) -> str:
        return f"PermutePixels(<{len(self.permutation)} features>)"


class Compose:
    """Batch transforms applied one after the other."""

    def __init__(self, *transforms: Callable[[Tensor], Tensor]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: Tensor) -> Tensor:
        for transform in self.transforms:
            x = transform(x)
        return x

    def __repr__(self) -> str:
        return f"Compose({', '.join(map(repr, self.transforms))})"


# ---------------------------------------------------------------------------- dataset
class TaskDataset(Dataset):
    """A map-style dataset of one task over in-memory tensors; batches by one tensor index.

    ``dataset[i]`` is one sample; ``dataset[indices]`` (a list, a 1-D integer tensor or a slice)
    and ``dataset.__getitems__(indices)`` are a whole batch, equal to the per-sample items
    stacked. Items are ``(inputs, targets)``, or ``(inputs, targets, task_ids)`` with
    ``with_task_ids=True`` (task-incremental scenarios, where a multi-head model reads the task
    id of each sample).

    Use it with ``DataLoader(dataset, ..., collate_fn=collate_batch)`` (what
    :class:`~neurenix.data.TaskSequenceDataModule` does): the loader's own sampler shuffles, so
    Lightning's ``DistributedSampler`` injection works as for any dataset, and ``num_workers``
    may be 0 or more.

    Args:
        inputs: the task's inputs, ``(N, ...)``; ``uint8`` or floating point.
        targets: the labels, ``(N,)`` integers (stored as ``int64``).
        task_id: the task's id (``>= 0``), in ``task_ids`` and in :attr:`task_id`.
        transform: a callable applied to each whole batch of inputs (and to single samples as
            batches of one), e.g. ``Compose(ToFloat(), Flatten())``.
        with_task_ids: whether items carry the task id as a third tensor.

    Raises:
        TypeError: an argument has the wrong type.
        ValueError: shapes disagree, the task is empty, or ``task_id`` is negative.

    Example::

        task = TaskDataset(images_uint8, labels, task_id=2, transform=Compose(ToFloat(), Flatten()))
        x, y = task[torch.tensor([0, 5, 7])]      # x: (3, 784) float32 in [0, 1]
    """

    def __init__(
        self,
        inputs: Tensor,
        targets: Tensor,
        task_id: int = 0,
        *,
        transform: Optional[Callable[[Tensor], Tensor]] = None,
        with_task_ids: bool = False,
    ) -> None:
        self.inputs, self.targets = _checked_tensors(inputs, targets)
        if isinstance(task_id, bool) or not isinstance(task_id, Integral) or task_id < 0:
            raise ValueError(f"task_id must be an int >= 0, got {task_id!r}")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable or None, got {type(transform).__name__}: {transform!r:.80}")
        self.task_id = int(task_id)
        self.transform = transform
        self.with_task_ids = bool(with_task_ids)

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, index: Index) -> Batch:
        if isinstance(index, slice):
            return self._batch(index)
        if _is_scalar_index(index):
            batch = self._batch(torch.tensor([int(index)]))
            return tuple(item[0] for item in batch)  # type: ignore[return-value]
        return self._batch(_index_tensor(index))

    def __getitems__(self, indices: Sequence[int]) -> Batch:
        """The batch of ``indices`` (``DataLoader`` calls this instead of one item per index)."""
        return self._batch(_index_tensor(indices))

    def _batch(self, index: Union[Tensor, slice]) -> Batch:
        x = self.inputs[index]
        if self.transform is not None:
            x = self.transform(x)
        y = self.targets[index]
        if not self.with_task_ids:
            return x, y
        return x, y, torch.full_like(y, self.task_id)

    @property
    def classes(self) -> list[int]:
        """The labels present in the task, sorted."""
        return torch.unique(self.targets).tolist()

    def __repr__(self) -> str:
        shape = "x".join(map(str, self.inputs.shape[1:])) or "scalar"
        return (
            f"TaskDataset(task_id={self.task_id}, samples={len(self)}, inputs={shape} {self.inputs.dtype}, "
            f"transform={self.transform!r}, with_task_ids={self.with_task_ids})"
        )


def _checked_tensors(inputs: Any, targets: Any) -> tuple[Tensor, Tensor]:
    for name, value in (("inputs", inputs), ("targets", targets)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if inputs.dim() == 0 or inputs.shape[0] == 0:
        raise ValueError(f"inputs must hold at least one sample, got shape {tuple(inputs.shape)}")
    if targets.dim() != 1 or targets.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"targets must be 1-D with one label per input, got targets of shape {tuple(targets.shape)} "
            f"for inputs of shape {tuple(inputs.shape)}"
        )
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must hold integer labels, got dtype {targets.dtype}")
    return inputs, targets.long()


def _is_scalar_index(index: object) -> bool:
    if isinstance(index, Tensor):
        return index.dim() == 0
    return isinstance(index, Integral) and not isinstance(index, bool)


def _index_tensor(indices: object) -> Tensor:
    index = indices if isinstance(indices, Tensor) else torch.as_tensor(indices)
    if index.dim() != 1 or (index.numel() and (index.is_floating_point() or index.dtype == torch.bool)):
        raise IndexError(f"a batch index must be a 1-D sequence of ints, got {indices!r:.80}")
    return index.long()
