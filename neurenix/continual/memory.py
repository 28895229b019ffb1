"""A fixed-size replay memory filled by reservoir sampling, held in preallocated tensors."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor

from neurenix.continual import functional as CF

__all__ = ["ReplayBatch", "ReservoirMemory"]


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
    a checkpoint resumes the same stream of decisions.
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


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)
