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

import collections.abc
import copy
import itertools
import warnings
from numbers import Integral
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

__all__ = [
    "AddChannel",
    "Compose",
    "ConcatTaskDataset",
    "Flatten",
    "PermutePixels",
    "SampleBatch",
    "TaskDataLoader",
    "TaskDataset",
    "TensorBatchSampler",
    "ToFloat",
    "collate_batch",
    "transform_to",
]

Index = Union[int, slice, Sequence[int], Tensor]
Device = Union[str, int, torch.device]
Batch = Union[tuple[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]


class SampleBatch(collections.abc.Sequence):
    """A whole batch built at once by ``__getitems__``, which also reads as a list of samples.

    :func:`collate_batch` hands the batch on as it was built. Any other ``collate_fn``
    (PyTorch's default one: a plain ``DataLoader(task, batch_size=32)``) sees ``N`` samples and
    stacks them as it would a dataset's items: the same batch, by the slower per-sample route,
    rather than an error about tensors of unequal size.
    """

    __slots__ = ("tensors",)

    def __init__(self, tensors: Batch) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return self.tensors[0].shape[0]

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return tuple(item[index] for item in self.tensors)


def collate_batch(batch: Union[SampleBatch, Batch]) -> Batch:
    """``collate_fn`` for a :class:`TaskDataset`: ``__getitems__`` already built the batch."""
    return batch.tensors if isinstance(batch, SampleBatch) else batch


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

    **On a device.** With ``device`` (where the dataset's tensors are: see
    :meth:`TaskDataset.to`), the epoch's order, drawn on the CPU as above (any other sampler's
    indices gathered into one tensor), is copied to ``device`` once per epoch and every batch of
    indices is a slice of it: a batch built from device-resident data then needs no
    host-to-device copy. The indices, and so the batches, are those of ``device=None``.

    Args:
        sampler: the sampler whose indices are batched (a finite one, with ``device``).
        batch_size: indices per batch.
        drop_last: whether a last, short batch is dropped.
        device: where the batches of indices are made, or ``None`` (the CPU; lists for samplers
            other than ``RandomSampler``/``SequentialSampler``).

    Raises:
        TypeError / ValueError: ``device`` is not a device (Lightning's own checks for the rest).
    """

    def __init__(self, sampler: Any, batch_size: int, drop_last: bool, *, device: Optional[Device] = None) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.device = None if device is None else _checked_device(device)

    def __iter__(self) -> Iterator[Union[list[int], Tensor]]:
        order = self._order()
        if order is None and self.device is None:
            yield from super().__iter__()
            return
        if order is None:  # another sampler (a DistributedSampler): its indices of this epoch, as they come
            order = torch.as_tensor(list(self.sampler), dtype=torch.long)
        if self.device is not None:
            order = order.to(self.device)  # once per epoch; every batch below is a slice of it
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


def _checked_device(device: object, name: str = "device") -> torch.device:
    """``device`` as a ``torch.device``, or an error naming ``name`` and the value.

    Raises:
        TypeError: ``device`` is not a ``torch.device``, a string or an int.
        ValueError: it does not name a device (``"gpu"``, ``"cuda:x"``, a negative index).
    """
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise TypeError(f"{name} must be a torch.device, a device string such as 'cuda:0', or an index, got {type(device).__name__}: {device!r:.80}")
    try:
        return torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"{name} must name a device such as 'cpu' or 'cuda:0', got {device!r} ({error})") from None


class TaskDataLoader(DataLoader):
    """A ``DataLoader`` that serves a :class:`TaskDataset` fast and can resume an epoch where it stopped.

    **Fast.** ``DataLoader``'s single-process iterator passes every batch through a fetcher, a
    profiler record and checks that matter for per-sample datasets; over a :class:`TaskDataset`,
    which builds a whole batch from one index tensor, that machinery costs about a quarter of the
    batch's time at batch size 32 (``benchmarks/datamodule_epoch.py``). Without worker processes
    and pinned memory this class iterates its batch sampler and calls the dataset's
    ``__getitems__`` and the ``collate_fn`` itself: the same batches, in the same order. With
    workers or ``pin_memory=True`` it iterates as a plain ``DataLoader``. Its constructor is
    ``DataLoader``'s, so Lightning can rebuild it with a ``DistributedSampler`` under DDP.

    **Resumable.** :meth:`state_dict` says where the epoch in progress stands: how many batches
    it has served, and what its order was drawn from (the state of the sampler's
    ``torch.Generator`` when the epoch began, and the epoch a ``DistributedSampler`` was set to).
    After :meth:`load_state_dict` the next iteration draws that same order and continues after
    the batches already served, skipping them as indices (no data is read for them). Lightning
    calls both for any training loader that has them: a checkpoint written in the middle of an
    epoch (``ModelCheckpoint(every_n_train_steps=...)``, a checkpoint on an exception or
    ``SIGTERM``) resumes with the batches the uninterrupted run would have seen. Between epochs
    the state holds the generator as it stands (the next epoch draws from it).

    The order is drawn when the first batch is asked for, not when ``iter()`` is called, so a
    ``DistributedSampler``'s order is the one of the epoch Lightning sets after creating the
    iterator. The order of a sampler is taken to follow from its ``generator`` and ``epoch``
    alone (true of PyTorch's ``SequentialSampler``, ``RandomSampler``, ``DistributedSampler``);
    a ``RandomSampler`` without a generator, which seeds itself from PyTorch's global generator,
    resumes at the right batch count but with a new order (a warning says so).
    """

    # Where the epoch in progress stands; instance attributes shadow these once iteration begins.
    # (No __init__ of its own: Lightning rebuilds the loader from DataLoader's signature.)
    _served: int = 0  # batches handed out in the epoch in progress
    _origin: Optional[dict[str, Any]] = None  # the sampler's state when the epoch began (_sampler_state)
    _pending: Optional[dict[str, Any]] = None  # a loaded state the next iteration starts from
    _skipping: Optional["_SkipCount"] = None  # batches of indices to skip while an iterator is built

    def __iter__(self) -> Iterator[Any]:
        return self._epoch()

    def _epoch(self) -> Iterator[Any]:
        # A generator: none of this runs before the first batch is asked for (see the class docstring).
        self._served = self._start_epoch()
        if self._lean():
            batches = self._lean_batches()
        else:
            skipping = self._skip_count()
            skipping.batches = self._served  # read through `_index_sampler` while DataLoader builds its iterator
            try:
                batches = super().__iter__()
            finally:
                skipping.batches = 0
        for batch in batches:
            self._served += 1  # counted when handed out: a checkpoint in `on_train_batch_end` counts it
            yield batch

    def _lean(self) -> bool:
        return not (self.num_workers > 0 or self.pin_memory or not hasattr(self.dataset, "__getitems__") or self.batch_sampler is None)

    def _lean_batches(self) -> Iterator[Any]:
        dataset, collate = self.dataset, self.collate_fn
        for indices in itertools.islice(iter(self.batch_sampler), self._served, None):  # type: ignore[arg-type]
            yield collate(dataset.__getitems__(indices))  # type: ignore[attr-defined]

    @property
    def _index_sampler(self) -> Any:
        # DataLoader's iterators read their batches of indices from this property (PyTorch's own
        # name for "batch_sampler, or sampler without automatic batching"), when they are built
        # and, with persistent workers, again at each epoch's start: they skip the batches an
        # epoch being resumed had already served.
        return _SkippedBatches(super()._index_sampler, self._skip_count())

    def _skip_count(self) -> "_SkipCount":
        # Its own object, not the loader: an iterator of persistent workers keeps the index sampler,
        # and a reference back to the loader would make a cycle that only the garbage collector
        # breaks, while the workers wait (seconds) to be shut down.
        if self._skipping is None:
            self._skipping = _SkipCount()
        return self._skipping

    def _start_epoch(self) -> int:
        """Apply a loaded position, remember where this epoch's order comes from; batches to skip."""
        pending, self._pending = self._pending, None
        sampler = self._order_sampler()
        if pending is not None:
            _restore_sampler(sampler, pending.get("sampler", {}))
        self._origin = _sampler_state(sampler)
        return 0 if pending is None else int(pending.get("batches", 0))

    def _order_sampler(self) -> Any:
        """The sampler whose state decides the order (the one inside the batch sampler)."""
        return self.sampler if self.batch_sampler is None else getattr(self.batch_sampler, "sampler", self.sampler)

    def _in_epoch(self) -> bool:
        if self._served == 0:
            return False
        try:
            return self._served < len(self)
        except TypeError:  # no length: an epoch that has served batches is taken to be in progress
            return True

    def state_dict(self) -> dict[str, Any]:
        """Where the next iteration starts: ``{"batches": served, "sampler": {...}}``.

        In the middle of an epoch, the batches it has served and the sampler's state when it
        began; otherwise no batches and the sampler's state as it stands.
        """
        if self._pending is not None:  # loaded and not started yet: still where the state says
            return {"batches": int(self._pending.get("batches", 0)), "sampler": dict(self._pending.get("sampler", {}))}
        if self._in_epoch():
            return {"batches": self._served, "sampler": dict(self._origin or {})}
        sampler_state = _sampler_state(self._order_sampler())
        sampler_state.pop("epoch", None)  # the next epoch's number is the trainer's to set
        return {"batches": 0, "sampler": sampler_state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Start the next iteration where ``state_dict`` (from :meth:`state_dict`) says.

        Raises:
            ValueError: ``state_dict`` does not come from :meth:`state_dict`.
        """
        batches = state_dict.get("batches") if isinstance(state_dict, dict) else None
        if isinstance(batches, bool) or not isinstance(batches, int) or batches < 0:
            raise ValueError(f"state_dict must be a TaskDataLoader.state_dict() with a batch count >= 0, got {state_dict!r:.120}")
        sampler = self._order_sampler()
        if batches and type(sampler) is RandomSampler and sampler.generator is None:
            warnings.warn(
                f"TaskDataLoader resumes its epoch after {batches} batches, but its RandomSampler has no generator "
                "(it seeds itself from PyTorch's global generator), so the rest of the epoch is a new order: give "
                "the sampler a torch.Generator to resume with the same batches",
                stacklevel=2,
            )
        self._pending = {"batches": batches, "sampler": dict(state_dict.get("sampler", {}))}


class _SkipCount:
    """How many batches the iterator being built skips (0 but while a resumed epoch's is built)."""

    batches = 0


class _SkippedBatches:
    """A loader's batch sampler, without the batches that its resumed epoch had served.

    The count is read at each ``iter()``: it is non-zero only while the loader builds (or, with
    persistent workers, resets) the iterator of an epoch it resumes.
    """

    def __init__(self, batch_sampler: Any, skipping: _SkipCount) -> None:
        self.batch_sampler, self.skipping = batch_sampler, skipping

    def __iter__(self) -> Iterator[Any]:
        return itertools.islice(iter(self.batch_sampler), self.skipping.batches, None)

    def __len__(self) -> int:
        return max(len(self.batch_sampler) - self.skipping.batches, 0)


def _sampler_state(sampler: Any) -> dict[str, Any]:
    """What a sampler's order is drawn from: its generator's state, its epoch (plain containers)."""
    state: dict[str, Any] = {}
    generator = getattr(sampler, "generator", None)
    if isinstance(generator, torch.Generator):
        state["generator"] = generator.get_state()
    if callable(getattr(sampler, "set_epoch", None)) and isinstance(getattr(sampler, "epoch", None), int):
        state["epoch"] = sampler.epoch
    return state


def _restore_sampler(sampler: Any, state: dict[str, Any]) -> None:
    generator = getattr(sampler, "generator", None)
    if "generator" in state and isinstance(generator, torch.Generator):
        generator.set_state(state["generator"].cpu())
    if "epoch" in state and callable(getattr(sampler, "set_epoch", None)):
        sampler.set_epoch(int(state["epoch"]))


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

    def to(self, device: Device) -> "ToFloat":
        """This transform (it holds no tensor): see :meth:`TaskDataset.to`."""
        return self

    def __repr__(self) -> str:
        return f"ToFloat(scale={self.scale!r}, dtype={self.dtype})"


class Flatten:
    """Each sample as a vector: ``(B, *shape)`` to ``(B, prod(shape))``."""

    def __call__(self, x: Tensor) -> Tensor:
        return x.flatten(1)

    def to(self, device: Device) -> "Flatten":
        """This transform (it holds no tensor): see :meth:`TaskDataset.to`."""
        return self

    def __repr__(self) -> str:
        return "Flatten()"


class AddChannel:
    """A channel dimension for convolutional models: ``(B, H, W)`` to ``(B, 1, H, W)``."""

    def __call__(self, x: Tensor) -> Tensor:
        return x.unsqueeze(1)

    def to(self, device: Device) -> "AddChannel":
        """This transform (it holds no tensor): see :meth:`TaskDataset.to`."""
        return self

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
        permutation = self.permutation
        if permutation.device != x.device:  # a copy per batch: move the transform with the data (`to`)
            permutation = permutation.to(x.device)
        return x.flatten(1)[:, permutation].reshape(x.shape)

    def to(self, device: Device) -> "PermutePixels":
        """A copy whose permutation is on ``device`` (this transform if it is there already)."""
        device = _checked_device(device)
        if self.permutation.device == device:
            return self
        moved = copy.copy(self)
        moved.permutation = self.permutation.to(device)
        return moved

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

    def to(self, device: Device) -> "Compose":
        """A copy whose transforms are on ``device`` (this one if none of them moves): see :meth:`TaskDataset.to`."""
        moved = [transform_to(transform, _checked_device(device)) for transform in self.transforms]
        if all(new is old for new, old in zip(moved, self.transforms)):
            return self
        return Compose(*moved)

    def __repr__(self) -> str:
        return f"Compose({', '.join(map(repr, self.transforms))})"


def transform_to(transform: Optional[Callable[[Tensor], Tensor]], device: Device, memo: Optional[dict[int, Any]] = None) -> Any:
    """``transform`` with its tensors on ``device``: what :meth:`TaskDataset.to` does to a task's transform.

    A transform with a ``to(device)`` method that returns the moved transform (this module's
    transforms) is moved by it; a ``torch.nn.Module`` is copied, then moved (its own ``to`` moves
    it in place, which would change the transform of the task it was taken from); any other
    callable (a function, a lambda) is kept as it is: it holds no tensor that this can see.
    ``memo`` maps the ``id`` of each transform moved to its moved copy, so that tasks sharing one
    transform (a split benchmark's) share one moved copy too.
    """
    if transform is None:
        return None
    memo = {} if memo is None else memo
    if id(transform) in memo:
        return memo[id(transform)]
    device = _checked_device(device)
    if isinstance(transform, torch.nn.Module):
        moved = copy.deepcopy(transform).to(device)
    elif callable(getattr(transform, "to", None)):
        moved = transform.to(device)
    else:
        moved = transform
    memo[id(transform)] = moved
    return moved


# ---------------------------------------------------------------------------- dataset
class _BatchedByIndex(Dataset):
    """A dataset whose items and batches are all built by :meth:`_batch` from one index tensor.

    ``dataset[i]`` is one sample; ``dataset[indices]`` (a list, a 1-D integer tensor or a slice)
    and ``__getitems__(indices)`` a whole batch, equal to the per-sample items stacked.
    """

    def __getitem__(self, index: Index) -> Batch:
        if isinstance(index, slice):
            return self._batch(self._slice_index(index))
        if _is_scalar_index(index):
            batch = self._batch(torch.tensor([int(index)]))
            return tuple(item[0] for item in batch)  # type: ignore[return-value]
        return self._batch(_index_tensor(index))

    def __getitems__(self, indices: Sequence[int]) -> SampleBatch:
        """The batch of ``indices`` (``DataLoader`` calls this instead of one item per index)."""
        return SampleBatch(self._batch(_index_tensor(indices)))

    def _slice_index(self, index: slice) -> Union[Tensor, slice]:
        """What :meth:`_batch` gets for a slice: the positions it covers."""
        return torch.arange(len(self))[index]

    def _batch(self, index: Any) -> Batch:
        raise NotImplementedError


class TaskDataset(_BatchedByIndex):
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

    def _slice_index(self, index: slice) -> slice:
        return index  # a slice of the stored tensors is a view: no index tensor to build

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

    @property
    def device(self) -> torch.device:
        """Where the task's tensors are, and so where its batches are built."""
        return self.inputs.device

    def to(self, device: Device) -> "TaskDataset":
        """A copy of the task whose tensors, and transform, are on ``device``.

        The inputs and targets are copied to ``device`` (shared, not copied, where they are there
        already) and so is the transform's state (:class:`PermutePixels`' permutation; see
        :func:`transform_to` for transforms of other kinds). Its batches are then built on
        ``device`` by indexing, with no host-to-device copy, from an index tensor on ``device``
        (:class:`TensorBatchSampler` with ``device=``, or an order of your own moved there once).
        This task is left as it is.

        Args:
            device: a ``torch.device``, a device string (``"cuda:0"``) or an index.

        Raises:
            TypeError / ValueError: ``device`` is not a device.

        Example::

            task = benchmark.train[0].to("cuda")
            order = torch.randperm(len(task)).to("cuda")         # one copy an epoch
            for indices in order.split(128):
                x, y = task[indices]                              # built on the GPU
        """
        return self._moved(_checked_device(device), {})

    def _moved(self, device: torch.device, memo: dict[int, Any]) -> "TaskDataset":
        """:meth:`to`, with the transforms already moved in ``memo`` (see :func:`transform_to`)."""
        moved = copy.copy(self)
        moved.inputs, moved.targets = self.inputs.to(device), self.targets.to(device)
        moved.transform = transform_to(self.transform, device, memo)
        return moved

    def __repr__(self) -> str:
        shape = "x".join(map(str, self.inputs.shape[1:])) or "scalar"
        return (
            f"TaskDataset(task_id={self.task_id}, samples={len(self)}, inputs={shape} {self.inputs.dtype}, "
            f"transform={self.transform!r}, with_task_ids={self.with_task_ids})"
        )


class ConcatTaskDataset(_BatchedByIndex):
    """The union of several :class:`TaskDataset` tasks, batched by one tensor index.

    Sample ``i`` of the union is sample ``i - offset`` of the task it falls in (the tasks one
    after the other, in the order given), and keeps that task's own ``task_id`` and
    ``transform``: permuted-MNIST tasks, each with its own :class:`PermutePixels`, stay each
    under its own permutation, and a multi-head model reads each sample's own task id. A batch is
    equal to the per-sample items stacked, in the order asked for. It is what
    :class:`~neurenix.data.TaskSequenceDataModule` serves for ``training="cumulative"`` and
    ``"joint"``.

    Members sharing one transform object, with stored inputs of one shape and dtype (a split
    benchmark's tasks), are transformed as one batch. On the CPU a batch is built from one gather
    per member it touches, found by counting the indices per member on the host (a read that
    costs nothing there). Off the CPU (tasks moved with :meth:`to`) it is built without reading
    the indices on the host, since such a read would wait for every kernel queued on the device:
    each member's rows are gathered for the whole batch and kept where the index falls in that
    member, so the work grows with the number of members (a few small gathers, and one transform
    per group of members sharing one), not with a synchronization. Both give the same batch.
    An index out of range is refused with an ``IndexError`` that names it, except in
    ``__getitems__`` (what a ``DataLoader`` calls, with indices its sampler made) off the CPU:
    the check would read the indices, so an index out of range fails there as tensor indexing
    does.

    Attributes:
        tasks: the member tasks, in order.
        with_task_ids: whether items carry task ids (as the members all do, or all do not).

    Args:
        tasks: the tasks to join (a non-empty list of :class:`TaskDataset`), whose items must
            agree: all with task ids or all without, the same transformed input shape and
            dtype, and the tensors on one device.

    Raises:
        TypeError: ``tasks`` is not a list of ``TaskDataset``.
        ValueError: ``tasks`` is empty, or its members disagree (task ids, transformed inputs,
            devices).

    Example::

        joint = ConcatTaskDataset(benchmark.train)         # every task's training data
        x, y, task_ids = joint[torch.tensor([0, 70_000])]  # task_ids: tensor([0, 1]) (60,000 a task)
    """

    def __init__(self, tasks: Sequence[TaskDataset]) -> None:
        self.tasks = _checked_members(tasks)
        self.with_task_ids = self.tasks[0].with_task_ids
        self._sizes = [len(task) for task in self.tasks]
        self._starts = list(itertools.accumulate(self._sizes, initial=0))[:-1]
        self._size = sum(self._sizes)
        # Members batched together: one transform object, stored inputs of one shape and dtype.
        self._groups = _shared_transform_groups(self.tasks)
        device = self.device
        self._ends = torch.tensor(self._sizes, device=device).cumsum(0)  # one past task k's last index in the union
        self._task_ids = torch.tensor([task.task_id for task in self.tasks], device=device)
        group_of = [0] * len(self.tasks)
        for number, group in enumerate(self._groups):
            for k in group:
                group_of[k] = number
        self._group_of = torch.tensor(group_of, device=device)
        self._starts_tensor = torch.tensor(self._starts, device=device)

    def __len__(self) -> int:
        return self._size

    @property
    def device(self) -> torch.device:
        """Where the members' tensors are, and so where batches are built."""
        return self.tasks[0].device

    def to(self, device: Device) -> "ConcatTaskDataset":
        """The union of the members moved to ``device`` (see :meth:`TaskDataset.to`); members sharing
        a transform share its moved copy.

        Raises:
            TypeError / ValueError: ``device`` is not a device.
        """
        return self._moved(_checked_device(device), {})

    def _moved(self, device: torch.device, memo: dict[int, Any]) -> "ConcatTaskDataset":
        return ConcatTaskDataset([task._moved(device, memo) for task in self.tasks])

    def __getitems__(self, indices: Sequence[int]) -> SampleBatch:
        """The batch of ``indices``, as a ``DataLoader`` asks for it: range-checked on the CPU only (see
        the class docstring)."""
        index = _index_tensor(indices)
        if _reads_are_free(index.device):
            index = self._in_range(index)
        return SampleBatch(self._gather(index))

    def _batch(self, index: Tensor) -> Batch:
        return self._gather(self._in_range(index))

    def _gather(self, index: Tensor) -> Batch:
        """The batch of ``index`` (entries in ``-len .. len-1``; others fail as tensor indexing does)."""
        size = len(self)
        index = torch.where(index < 0, index + size, index)
        # Still negative: out of range. Made `size`, it falls past the last member, and the lookup of
        # its member's start or task id fails as tensor indexing does (no read here to find out first).
        index = index.masked_fill(index < 0, size)
        if _reads_are_free(index.device):
            return self._gather_by_members(index)
        return self._gather_without_reads(index)

    def _gather_by_members(self, index: Tensor) -> Batch:
        """The batch of ``index`` (entries in ``0 .. len``) from one gather per member it touches: the
        counts per member are read on the host, which on the CPU costs nothing, and each sample is
        gathered and transformed once."""
        member = torch.searchsorted(self._ends, index, right=True)
        local = index - self._starts_tensor[member]
        counts = torch.bincount(member, minlength=len(self.tasks)).tolist()
        present = [k for k, count in enumerate(counts) if count]
        if len(present) <= 1:  # one task's batch (or an empty one, of the members' shapes): no reordering
            return self.tasks[present[0] if present else 0]._batch(local)
        # Where each member's samples go in the batch; a stable sort keeps the order asked for within each.
        positions = torch.argsort(member, stable=True).split(counts)
        out: Optional[list[Tensor]] = None
        for group in self._groups:
            run = [k for k in group if counts[k]]
            if not run:
                continue
            where = torch.cat([positions[k] for k in run])
            part = self._run_batch(run, [local[positions[k]] for k in run], where, len(index))
            if len(where) == len(index) and len(run) > 1:  # one run: `part` is the batch, in order
                return part
            if out is None:
                out = [item.new_empty((len(index), *item.shape[1:])) for item in part]
            for whole, piece in zip(out, part):
                whole[where] = piece
        return tuple(out)  # type: ignore[arg-type, return-value]

    def _run_batch(self, run: list[int], parts: list[Tensor], where: Tensor, size: int) -> Batch:
        """The samples ``parts`` of the members ``run`` (which share one transform), in the order of
        ``where``, or, when they are the whole batch (``size`` samples), in the batch's order."""
        if len(run) == 1:
            return self.tasks[run[0]]._batch(parts[0])
        tasks = [self.tasks[k] for k in run]
        x = torch.cat([task.inputs[part] for task, part in zip(tasks, parts)])
        y = torch.cat([task.targets[part] for task, part in zip(tasks, parts)])
        ids = self._task_ids[torch.tensor(run)].repeat_interleave(torch.tensor([len(part) for part in parts]))
        if len(where) == size:  # the stored samples in the batch's order, then one transform
            order = torch.empty_like(where)
            order[where] = torch.arange(size)
            x, y, ids = x[order], y[order], ids[order]
        transform = tasks[0].transform
        x = x if transform is None else transform(x)
        return (x, y, ids) if self.with_task_ids else (x, y)

    def _gather_without_reads(self, index: Tensor) -> Batch:
        """The batch of ``index`` (entries in ``0 .. len``), read nowhere on the host (see the class docstring)."""
        member = torch.searchsorted(self._ends, index, right=True)
        task_ids = self._task_ids[member]
        x: Optional[Tensor] = None
        y: Optional[Tensor] = None
        single = len(self._groups) == 1
        for number, group in enumerate(self._groups):
            part_x, part_y = self._group_batch(group, index, member)
            if single:
                x, y = part_x, part_y
                break
            chosen = self._group_of[member] == number
            x = part_x if x is None else torch.where(_rows(chosen, part_x), part_x, x)
            y = part_y if y is None else torch.where(chosen, part_y, y)
        return (x, y, task_ids) if self.with_task_ids else (x, y)  # type: ignore[return-value]

    def _group_batch(self, group: list[int], index: Tensor, member: Tensor) -> tuple[Tensor, Tensor]:
        """The inputs and targets of the whole batch as the members ``group`` give them: right in the
        rows of those members' samples (the other rows hold a sample of some member of the group)."""
        tasks = [self.tasks[k] for k in group]
        if not _plain_batching(tasks[0]):  # a TaskDataset subclass of its own batching: its own batch
            x, y = tasks[0]._batch(self._local(group[0], index))[:2]
            return x, y
        x: Optional[Tensor] = None
        y: Optional[Tensor] = None
        for k, task in zip(group, tasks):
            local = self._local(k, index)
            stored, targets = task.inputs[local], task.targets[local]
            if x is None:
                x, y = stored, targets
            else:
                mine = member == k
                x, y = torch.where(_rows(mine, stored), stored, x), torch.where(mine, targets, y)
        transform = tasks[0].transform
        return (x if transform is None else transform(x)), y  # type: ignore[return-value]

    def _local(self, k: int, index: Tensor) -> Tensor:
        """Each index as a position in member ``k``: right for its samples, in range for the others."""
        return (index - self._starts[k]).clamp_(0, self._sizes[k] - 1)

    def _in_range(self, index: Tensor) -> Tensor:
        """``index`` itself, or an ``IndexError`` naming its first entry out of range (read on the host)."""
        size = len(self)
        if index.numel() and (int(index.min()) < -size or int(index.max()) >= size):
            bad = index[(index < -size) | (index >= size)][0]
            raise IndexError(f"index {int(bad)} is out of range for a ConcatTaskDataset of {size} samples")
        return index

    @property
    def targets(self) -> Tensor:
        """Every sample's label, in the union's order."""
        return torch.cat([task.targets for task in self.tasks])

    @property
    def classes(self) -> list[int]:
        """The labels present in any of the tasks, sorted."""
        return torch.unique(self.targets).tolist()

    @property
    def task_ids(self) -> list[int]:
        """The members' task ids, in order."""
        return [task.task_id for task in self.tasks]

    def __repr__(self) -> str:
        return f"ConcatTaskDataset(task_ids={self.task_ids}, samples={len(self)}, with_task_ids={self.with_task_ids})"


def _reads_are_free(device: torch.device) -> bool:
    """Whether reading a tensor of ``device`` on the host costs nothing (no queue to wait for): on the
    CPU a union's batch is built from the members its indices touch, counted on the host; elsewhere
    without reading them. (Tests patch this to build batches on the CPU as on an accelerator.)"""
    return device.type == "cpu"


def _rows(mask: Tensor, like: Tensor) -> Tensor:
    """A per-sample ``mask`` shaped to select whole rows of ``like`` in ``torch.where``."""
    return mask.view(-1, *([1] * (like.dim() - 1)))


def _plain_batching(task: TaskDataset) -> bool:
    return type(task)._batch is TaskDataset._batch


def _shared_transform_groups(tasks: list[TaskDataset]) -> list[list[int]]:
    """The members' positions grouped by what can be transformed as one batch: plain
    :class:`TaskDataset` batching, the same transform object, stored inputs of one shape and dtype
    (the tasks of a split benchmark share their transform: a batch of them is one transform)."""
    groups: list[list[int]] = []
    for k, task in enumerate(tasks):
        group = next((g for g in groups if _batches_with(tasks[g[0]], task)), None)
        if group is None:
            groups.append([k])
        else:
            group.append(k)
    return groups


def _batches_with(a: TaskDataset, b: TaskDataset) -> bool:
    return (
        _plain_batching(a)
        and _plain_batching(b)
        and a.transform is b.transform
        and a.inputs.shape[1:] == b.inputs.shape[1:]
        and a.inputs.dtype == b.inputs.dtype
    )


def _checked_members(tasks: object) -> list[TaskDataset]:
    if isinstance(tasks, (str, bytes, Dataset)) or not isinstance(tasks, Sequence):
        raise TypeError(f"tasks must be a list of TaskDataset, got {type(tasks).__name__}: {tasks!r:.80}")
    tasks = list(tasks)
    if not tasks:
        raise ValueError(f"tasks must hold at least one TaskDataset, got {tasks!r}")
    for k, task in enumerate(tasks):
        if not isinstance(task, TaskDataset):
            raise TypeError(f"tasks[{k}] must be a TaskDataset, got {type(task).__name__}: {task!r:.80}")
    first = tasks[0]
    flags = [task.with_task_ids for task in tasks]
    if len(set(flags)) > 1:
        raise ValueError(
            f"tasks must all carry task ids or all not, got with_task_ids={flags}: a batch mixing them would "
            "have task ids for some samples only"
        )
    devices = [task.device for task in tasks]
    for k, task in enumerate(tasks):
        if task.device != devices[0] or task.targets.device != devices[0]:
            raise ValueError(
                f"tasks[{k}] (task_id={task.task_id}) holds tensors on {task.inputs.device} and {task.targets.device}, but "
                f"tasks[0] (task_id={first.task_id}) on {devices[0]}: the tasks of one batch must be on one device "
                "(move them with TaskDataset.to)"
            )
    x0 = first[0:1][0]  # one transformed sample: what a batch of the union must agree on
    for k, task in enumerate(tasks[1:], start=1):
        x = task[0:1][0]
        if x.shape[1:] != x0.shape[1:] or x.dtype != x0.dtype:
            raise ValueError(
                f"tasks[{k}] (task_id={task.task_id}) gives inputs of shape {tuple(x.shape[1:])} {x.dtype} after its "
                f"transform, but tasks[0] (task_id={first.task_id}) gives {tuple(x0.shape[1:])} {x0.dtype}: the tasks of "
                "one batch must agree"
            )
    return tasks


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
