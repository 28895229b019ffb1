"""Fixed-size replay memories held in preallocated tensors.

- :class:`ReservoirMemory`: reservoir sampling over the whole stream (every sample offered is kept
  with the same probability);
- :class:`ClassBalancedMemory`: the memory split evenly over the classes seen so far, each class's
  share a reservoir of that class's own stream.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor

from neurenix.continual import functional as CF

__all__ = ["ClassBalancedMemory", "ReplayBatch", "ReservoirMemory"]


class ReplayBatch(NamedTuple):
    """Samples drawn from a replay memory: ``inputs, targets, task_ids = batch``."""

    inputs: Tensor
    targets: Tensor
    task_ids: Tensor


class ReservoirMemory:
    """``capacity`` samples kept uniformly over everything offered so far (Vitter's Algorithm R).

    Storage is allocated on the first insert (its shapes and dtypes come from that batch) on
    ``device``, and every later insert and draw is a handful of vectorized tensor operations.
    Randomness comes from the memory's own generator, so a run is repeatable from its seed and
    a checkpoint resumes the same stream of decisions. The generator lives on ``device`` with the
    samples, so a training step copies nothing between host and device; the price is that a CUDA
    generator makes other decisions than a CPU one from the same seed, and a checkpoint resumed on
    another kind of device continues from a generator reseeded with ``seed + num_seen``.
    """

    def __init__(self, capacity: int, device: torch.device, seed: int) -> None:
        self.capacity = capacity
        self.device = device
        self.num_seen = 0
        self.size = 0
        self._seed = seed
        self._generator = _generator(device, seed)
        self._inputs: Optional[Tensor] = None
        self._targets: Optional[Tensor] = None
        self._task_ids: Optional[Tensor] = None

    def __len__(self) -> int:
        return self.size

    def add(self, inputs: Tensor, targets: Tensor, task_ids: Tensor) -> None:
        """Offer a batch to the memory (shapes and dtypes checked against what it holds)."""
        if self.capacity == 0:
            self.num_seen += inputs.shape[0]
            return
        if self._inputs is None:
            self._allocate(inputs, targets)
        else:
            self._check_like_stored("inputs", inputs, self._inputs)
            self._check_like_stored("targets", targets, self._targets)
        positions, slots = CF.reservoir_slots(
            self.num_seen, inputs.shape[0], self.capacity, self._generator, self.device
        )
        self._inputs[slots] = inputs.to(self.device)[positions]  # type: ignore[index]
        self._targets[slots] = targets.to(self.device)[positions]  # type: ignore[index]
        self._task_ids[slots] = task_ids.to(self.device, torch.long)[positions]  # type: ignore[index]
        self.num_seen += inputs.shape[0]
        self.size = min(self.capacity, self.num_seen)

    def sample(self, count: int) -> ReplayBatch:
        """``min(count, len(self))`` distinct stored samples, uniformly at random."""
        if self.size == 0 or self._inputs is None:
            raise ValueError("cannot draw a replay batch: the replay memory is empty (add_to_memory first)")
        chosen = torch.randperm(self.size, generator=self._generator, device=self.device)[:count]
        return ReplayBatch(self._inputs[chosen], self._targets[chosen], self._task_ids[chosen])  # type: ignore[index]

    def _allocate(self, inputs: Tensor, targets: Tensor) -> None:
        self._inputs = torch.empty((self.capacity, *inputs.shape[1:]), dtype=inputs.dtype, device=self.device)
        self._targets = torch.empty((self.capacity, *targets.shape[1:]), dtype=targets.dtype, device=self.device)
        self._task_ids = torch.empty(self.capacity, dtype=torch.long, device=self.device)

    @staticmethod
    def _check_like_stored(name: str, given: Tensor, stored: Optional[Tensor]) -> None:
        assert stored is not None
        if given.shape[1:] != stored.shape[1:] or given.dtype != stored.dtype:
            raise ValueError(
                f"{name} of shape {tuple(given.shape)} and dtype {given.dtype} do not match the replay "
                f"memory, which holds samples of shape {tuple(stored.shape[1:])} and dtype {stored.dtype}"
            )

    def check_batch(self, inputs: Tensor, targets: Tensor) -> None:
        """Raise ``ValueError`` if the batch cannot be stored beside what the memory holds."""
        if self._inputs is not None:
            self._check_like_stored("inputs", inputs, self._inputs)
            self._check_like_stored("targets", targets, self._targets)

    # ---------------------------------------------------------------------------- device & state
    def to(self, device: torch.device) -> None:
        """Move the storage (and the generator's stream) to ``device``."""
        if device == self.device:
            return
        state = self.state_dict()
        self.device = device
        self.load_state_dict(state)

    def state_dict(self) -> dict[str, Any]:
        size = self.size
        return {
            "num_seen": self.num_seen,
            "inputs": None if self._inputs is None else self._inputs[:size].clone(),
            "targets": None if self._targets is None else self._targets[:size].clone(),
            "task_ids": None if self._task_ids is None else self._task_ids[:size].clone(),
            "generator": self._generator.get_state(),
            "generator_device": self.device.type,
            "seed": self._seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_seen = int(state.get("num_seen", 0))
        self._seed = int(state.get("seed", self._seed))
        inputs, targets, task_ids = state.get("inputs"), state.get("targets"), state.get("task_ids")
        self._inputs = self._targets = self._task_ids = None
        self.size = 0
        if inputs is not None and self.capacity > 0:
            self._allocate(inputs, targets)
            kept = min(inputs.shape[0], self.capacity)
            self._inputs[:kept] = inputs[:kept].to(self.device)  # type: ignore[index]
            self._targets[:kept] = targets[:kept].to(self.device)  # type: ignore[index]
            self._task_ids[:kept] = task_ids[:kept].to(self.device)  # type: ignore[index]
            self.size = kept
        self._generator = _generator(self.device, self._seed)
        generator = state.get("generator")
        if generator is not None and state.get("generator_device", "cpu") == self.device.type:
            self._generator.set_state(generator.cpu())
        else:  # the stream cannot move across device types; reseed it deterministically
            self._generator = _generator(self.device, self._seed + self.num_seen)


class ClassBalancedMemory(ReservoirMemory):
    """``capacity`` samples split evenly over the classes seen so far, each class a reservoir.

    With ``C`` classes seen, the ``k``-th class to arrive (0-based; classes first seen in the same
    batch arrive in label order) may hold ``quota(k) = floor(M/C) + (k < M mod C)`` samples, so
    the shares differ by at most one and sum to ``M`` (once ``C > M``, the later classes get no
    share). Each class's share is a reservoir (Algorithm R) over that class's own stream: every
    sample of the class offered so far is kept with the same probability. When a new class
    arrives the quotas shrink, and each class over its new quota keeps a uniformly drawn subset
    of what it holds (a uniform subset of a uniform sample is a uniform sample), so the
    invariant holds at every step. A class that has been offered fewer samples than its quota
    keeps all of them; its unused share stays free.

    Targets must be class labels (1-D integers). Storage stays compact (slots ``0 .. size-1``),
    so drawing a replay batch is the same uniform draw over the stored samples as for
    :class:`ReservoirMemory`, and the state dict holds exactly the stored samples in slot order.
    """

    def __init__(self, capacity: int, device: torch.device, seed: int) -> None:
        super().__init__(capacity, device, seed)
        #: class labels in order of arrival, and how many samples of each were offered.
        self.classes: list[int] = []
        self.class_seen: dict[int, int] = {}

    # ---------------------------------------------------------------------------- quotas
    def quota(self, label: int) -> int:
        """The most samples class ``label`` may hold now (0 for a class never offered)."""
        if label not in self.class_seen:
            return 0
        share, remainder = divmod(self.capacity, len(self.classes))
        return share + int(self.classes.index(label) < remainder)

    def class_sizes(self) -> dict[int, int]:
        """Samples held per class, for every class seen (in order of arrival)."""
        sizes = dict.fromkeys(self.classes, 0)
        if self.size and self._targets is not None:
            labels, counts = torch.unique(self._targets[: self.size], return_counts=True)
            sizes.update(zip(labels.tolist(), counts.tolist()))
        return sizes

    # ---------------------------------------------------------------------------- insertion
    def add(self, inputs: Tensor, targets: Tensor, task_ids: Tensor) -> None:
        """Offer a batch: new classes first shrink the others' shares, then each class's samples
        enter its own reservoir."""
        self.check_batch(inputs, targets)
        if self.capacity > 0 and self._inputs is None:
            self._allocate(inputs, targets)
        # Moved once, not once per class below.
        inputs, labels, task_ids = inputs.to(self.device), targets.to(self.device), task_ids.to(self.device, torch.long)
        present = torch.unique(labels).tolist()  # sorted: ties between new classes go by label
        new_classes = [label for label in present if label not in self.class_seen]
        if new_classes:
            self.classes.extend(new_classes)
            self.class_seen.update(dict.fromkeys(new_classes, 0))
            self._shrink_to_quotas()
        for label in present:
            positions = torch.nonzero(labels == label).squeeze(1)
            if self.capacity > 0:
                self._add_to_class(label, positions, inputs, labels, task_ids)
            self.class_seen[label] += positions.shape[0]
        self.num_seen += inputs.shape[0]

    def _add_to_class(self, label: int, positions: Tensor, inputs: Tensor, targets: Tensor, task_ids: Tensor) -> None:
        """Class ``label``'s samples (``positions`` of the batch, already on the memory's device)."""
        held = self._slots_of(label)
        chosen, local_slots = CF.reservoir_slots(
            self.class_seen[label], positions.shape[0], self.quota(label), self._generator, self.device
        )
        # Local slots below the class's holding replace one of its samples; the others (only while
        # the class is below its quota) are the next free slots, in order, at the end of storage.
        filling = local_slots >= held.shape[0]
        slots = self.size + local_slots - held.shape[0]
        slots[~filling] = held[local_slots[~filling]]
        source = positions[chosen]
        self._inputs[slots] = inputs[source]  # type: ignore[index]
        self._targets[slots] = targets[source]  # type: ignore[index]
        self._task_ids[slots] = task_ids[source]  # type: ignore[index]
        self.size += int(filling.sum())

    def _slots_of(self, label: int) -> Tensor:
        """The storage slots holding class ``label``, in slot order (its reservoir's local slots)."""
        if self._targets is None or self.size == 0:
            return torch.zeros(0, dtype=torch.long, device=self.device)
        return torch.nonzero(self._targets[: self.size] == label).squeeze(1)

    def _shrink_to_quotas(self) -> None:
        """Every class over its quota keeps a uniform subset of its samples; storage is compacted."""
        if self.size == 0 or self._targets is None:
            return
        keep = torch.ones(self.size, dtype=torch.bool, device=self.device)
        for label, held in self.class_sizes().items():
            excess = held - self.quota(label)
            if excess > 0:
                slots = self._slots_of(label)
                dropped = torch.randperm(held, generator=self._generator, device=self.device)[:excess]
                keep[slots[dropped]] = False
        if bool(keep.all()):
            return
        kept = int(keep.sum())
        for storage in (self._inputs, self._targets, self._task_ids):
            storage[:kept] = storage[: self.size][keep]  # type: ignore[index]  # a copy: no overlap hazard
        self.size = kept

    def check_batch(self, inputs: Tensor, targets: Tensor) -> None:
        """Raise ``ValueError`` unless ``targets`` are class labels and the batch fits what is stored."""
        if targets.dim() != 1 or targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise ValueError(
                "a class-balanced memory needs class labels as targets (a 1-D integer tensor), got "
                f"targets of shape {tuple(targets.shape)} and dtype {targets.dtype}"
            )
        super().check_batch(inputs, targets)

    # ---------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "classes": torch.tensor(self.classes, dtype=torch.long),
            "class_seen": torch.tensor([self.class_seen[label] for label in self.classes], dtype=torch.long),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output, or a plain reservoir's (pooled DDP memories, older
        checkpoints): then the classes are those stored, in order of first slot, each counted as
        seen in proportion to its share of the memory, and the shares are re-balanced."""
        super().load_state_dict(state)
        classes, seen = state.get("classes"), state.get("class_seen")
        if classes is not None and seen is not None:
            self.classes = [int(label) for label in classes.tolist()]
            self.class_seen = dict(zip(self.classes, (int(n) for n in seen.tolist())))
        else:
            stored = [] if self._targets is None else self._targets[: self.size].tolist()
            self.classes = list(dict.fromkeys(stored))
            counts = {label: stored.count(label) for label in self.classes}
            scale = self.num_seen / max(len(stored), 1)
            self.class_seen = {label: max(count, round(count * scale)) for label, count in counts.items()}
        self._shrink_to_quotas()


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)
