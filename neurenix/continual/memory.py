"""Fixed-size replay memories held in preallocated tensors.

- :class:`ReservoirMemory`: reservoir sampling over the whole stream (every sample offered is kept
  with the same probability);
- :class:`ClassBalancedMemory`: the memory split evenly over the classes seen so far, each class's
  share a reservoir of that class's own stream;
- :class:`TaskBalancedMemory`: the same split over the tasks seen so far (GEM's and A-GEM's
  episodic memory: each earlier task keeps an equal share);
- :class:`ExemplarMemory`: the class split of :class:`ClassBalancedMemory`, each class keeping
  the first samples of a selection order (herding, closest to the mean, random) chosen from a
  task's data at its end (iCaRL's exemplar sets).

Every memory stores a sample's inputs, target and task id, and any further per-sample fields a
method gives :meth:`ReservoirMemory.add` (Dark Experience Replay's logits).

Storing a batch reads nothing from the device in :class:`ReservoirMemory`, nor in
:class:`TaskBalancedMemory` when the batch's task is given as an int; :class:`ClassBalancedMemory`
reads which classes a batch holds (one host-device synchronization per insert on a GPU), unless
the classes to come were announced (:meth:`BalancedMemory.announce`) and every class holds its
full share.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor
from typing_extensions import override

from neurenix.continual import functional as CF

__all__ = ["BalancedMemory", "ClassBalancedMemory", "ExemplarMemory", "ReplayBatch", "ReservoirMemory", "TaskBalancedMemory"]

#: The fields every memory stores, in the order of a :class:`ReplayBatch`.
SAMPLE_FIELDS = ("inputs", "targets", "task_ids")


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
    samples, and an insert is one indexed write whose shape does not depend on the draws (storage
    has one spare row, at index ``capacity``, that takes the samples kept nowhere), so a training
    step neither copies nor synchronizes between host and device; the price is that a CUDA
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
        #: Storage per field (``inputs``, ``targets``, ``task_ids``, then any extras), allocated
        #: on the first insert.
        self._fields: dict[str, Tensor] = {}

    def __len__(self) -> int:
        return self.size

    @property
    def _inputs(self) -> Optional[Tensor]:
        return self._fields.get("inputs")

    @property
    def _targets(self) -> Optional[Tensor]:
        return self._fields.get("targets")

    @property
    def _task_ids(self) -> Optional[Tensor]:
        return self._fields.get("task_ids")

    def add(self, inputs: Tensor, targets: Tensor, task_ids: Union[Tensor, int], **extras: Tensor) -> None:
        """Offer a batch to the memory (shapes and dtypes checked against what it holds).

        ``task_ids`` is each sample's task id, or one int for a batch of one task. ``extras`` are
        further per-sample fields (``logits=...``), stored beside the others; every insert must
        give the same ones.
        """
        if self.capacity == 0:
            self.num_seen += inputs.shape[0]
            return
        batch = self._batch_fields(inputs, targets, task_ids, extras)
        slots = CF.reservoir_slots(self.num_seen, inputs.shape[0], self.capacity, self._generator, self.device)
        for name, values in batch.items():
            self._fields[name][slots] = values
        self.num_seen += inputs.shape[0]
        self.size = min(self.capacity, self.num_seen)

    def _batch_fields(
        self, inputs: Tensor, targets: Tensor, task_ids: Union[Tensor, int], extras: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """The batch as ``{field: values}`` on the memory's device, checked against (or
        allocating) the storage."""
        if isinstance(task_ids, int):
            task_ids = torch.full((inputs.shape[0],), task_ids, dtype=torch.long, device=self.device)
        batch = {"inputs": inputs, "targets": targets, "task_ids": task_ids.to(torch.long), **extras}
        batch = {name: values.to(self.device) for name, values in batch.items()}
        if self.capacity == 0:
            return batch
        if not self._fields:
            self._allocate(batch)
        else:
            self._check_like_stored(batch)
        return batch

    def draw(self, count: int) -> Tensor:
        """``min(count, len(self))`` distinct slots, uniformly at random (from the memory's generator)."""
        if self.size == 0 or not self._fields:
            raise ValueError("cannot draw a replay batch: the replay memory is empty (add_to_memory first)")
        return torch.randperm(self.size, generator=self._generator, device=self.device)[:count]

    def draw_from(self, slots: Tensor, count: int) -> Tensor:
        """``min(count, len(slots))`` of ``slots``, distinct, uniformly at random (from the
        memory's generator: repeatable from the seed, resumed by a checkpoint)."""
        if slots.shape[0] <= count:
            return slots
        return slots[torch.randperm(slots.shape[0], generator=self._generator, device=slots.device)[:count]]

    def take(self, slots: Tensor) -> ReplayBatch:
        """The samples in ``slots``: ``(inputs, targets, task_ids)``."""
        return ReplayBatch(*(self._fields[name][slots] for name in SAMPLE_FIELDS))

    def field(self, name: str, slots: Tensor) -> Tensor:
        """Field ``name`` (an extra such as ``"logits"``) of the samples in ``slots``."""
        return self._fields[name][slots]

    def sample(self, count: int) -> ReplayBatch:
        """``min(count, len(self))`` distinct stored samples, uniformly at random."""
        return self.take(self.draw(count))

    def _allocate(self, batch: dict[str, Tensor]) -> None:
        # One row more than the capacity: the spare row (index ``capacity``) takes the samples of
        # an insert that are kept nowhere, so an insert never selects rows by what was drawn.
        self._fields = {
            name: torch.empty((self.capacity + 1, *values.shape[1:]), dtype=values.dtype, device=self.device)
            for name, values in batch.items()
        }

    def _check_like_stored(self, batch: dict[str, Tensor]) -> None:
        if set(batch) != set(self._fields):
            raise ValueError(
                f"the memory stores the fields {sorted(self._fields)}, got a batch with {sorted(batch)}"
            )
        for name, given in batch.items():
            stored = self._fields[name]
            if given.shape[1:] != stored.shape[1:] or given.dtype != stored.dtype:
                raise ValueError(
                    f"{name} of shape {tuple(given.shape)} and dtype {given.dtype} do not match the replay "
                    f"memory, which holds samples of shape {tuple(stored.shape[1:])} and dtype {stored.dtype}"
                )

    def check_batch(self, inputs: Tensor, targets: Tensor) -> None:
        """Raise ``ValueError`` if the batch cannot be stored beside what the memory holds."""
        for name, given in (("inputs", inputs), ("targets", targets)):
            stored = self._fields.get(name)
            if stored is not None and (given.shape[1:] != stored.shape[1:] or given.dtype != stored.dtype):
                raise ValueError(
                    f"{name} of shape {tuple(given.shape)} and dtype {given.dtype} do not match the replay "
                    f"memory, which holds samples of shape {tuple(stored.shape[1:])} and dtype {stored.dtype}"
                )

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
        stored = {name: None for name in SAMPLE_FIELDS}
        stored.update({name: values[:size].clone() for name, values in self._fields.items()})
        return {
            "num_seen": self.num_seen,
            **stored,
            "extra_fields": [name for name in self._fields if name not in SAMPLE_FIELDS],
            "generator": self._generator.get_state(),
            "generator_device": self.device.type,
            "seed": self._seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.num_seen = int(state.get("num_seen", 0))
        self._seed = int(state.get("seed", self._seed))
        self._fields = {}
        self.size = 0
        stored = stored_fields(state)
        if stored and self.capacity > 0:
            kept = min(stored["inputs"].shape[0], self.capacity)
            self._allocate(stored)
            for name, values in stored.items():
                self._fields[name][:kept] = values[:kept].to(self.device)
            self.size = kept
        self._generator = _generator(self.device, self._seed)
        generator = state.get("generator")
        if generator is not None and state.get("generator_device", "cpu") == self.device.type:
            self._generator.set_state(generator.cpu())
        else:  # the stream cannot move across device types; reseed it deterministically
            self._generator = _generator(self.device, self._seed + self.num_seen)


def stored_fields(state: dict[str, Any]) -> dict[str, Tensor]:
    """The per-sample fields of a memory's state dict (``inputs``, ``targets``, ``task_ids``, then
    its ``extra_fields``); empty for a memory that never stored a sample."""
    if state.get("inputs") is None:
        return {}
    names = (*SAMPLE_FIELDS, *state.get("extra_fields", ()))
    return {name: state[name] for name in names}


class BalancedMemory(ReservoirMemory):
    """``capacity`` samples split evenly over the groups seen so far, each group a reservoir.

    A sample's group is one of its fields (:attr:`group_field`): its class label
    (:class:`ClassBalancedMemory`) or its task id (:class:`TaskBalancedMemory`). With ``G`` groups
    seen, the ``k``-th group to arrive (0-based; groups first seen in the same batch arrive in
    order of their key) may hold ``quota(k) = floor(M/G) + (k < M mod G)`` samples, so the shares
    differ by at most one and sum to ``M`` (once ``G > M``, the later groups get no share). Each
    group's share is a reservoir (Algorithm R) over that group's own stream: every sample of the
    group offered so far is kept with the same probability. When a new group arrives the quotas
    shrink, and each group over its new quota keeps a uniformly drawn subset of what it holds (a
    uniform subset of a uniform sample is a uniform sample), so the invariant holds at every step.
    A group that has been offered fewer samples than its quota keeps all of them; its unused
    share stays free.

    Storage stays compact (slots ``0 .. size-1``), so drawing a replay batch is the same uniform
    draw over the stored samples as for :class:`ReservoirMemory`, and the state dict holds exactly
    the stored samples in slot order. The groups' counts are kept on the host, so an insert reads
    from the device only which groups the batch holds (one synchronization on a GPU), and not
    even that when the caller names the batch's one group (a task id given as an int to a
    :class:`TaskBalancedMemory`). A new group's arrival re-balances the shares, which reads the
    device (once per group).

    When the caller knows which groups the coming batches hold (:meth:`announce`: the classes of
    a fit's training data), an insert reads nothing once every group holds its full share: each
    group's slots are then fixed (a sample can only replace one of its group's), so the groups'
    counts move to the device and each sample's reservoir decision is made there. Until then
    (a new class filling its share) an insert reads as above.
    """

    #: The field whose value is a sample's group, and the state dict's names for the groups in
    #: order of arrival and for how many samples of each were offered.
    group_field = "targets"
    state_names = ("groups", "group_seen")
    #: What the groups are, in messages.
    group_name = "groups"

    def __init__(self, capacity: int, device: torch.device, seed: int) -> None:
        super().__init__(capacity, device, seed)
        #: group keys in order of arrival, how many samples of each were offered, how many are held.
        self.groups: list[int] = []
        self._group_seen: dict[int, int] = {}
        self._held: dict[int, int] = {}
        #: The groups announced for the coming batches (``None``: any group may come).
        self.announced: Optional[frozenset[int]] = None
        #: While announced and every group is full: the inserts' bookkeeping on the device.
        self._on_device: Optional[_DeviceInserts] = None
        #: key -> the slots holding that group's samples, while the layout they describe stands.
        self._slots_cache: dict[int, Tensor] = {}

    @property
    def group_seen(self) -> dict[int, int]:
        """How many samples of each group were offered (read from the device while inserts run there)."""
        if self._on_device is not None:
            self._pull_counts()
        return self._group_seen

    @group_seen.setter
    def group_seen(self, counts: dict[int, int]) -> None:
        self._group_seen = counts

    # ---------------------------------------------------------------------------- announced groups
    def announce(self, keys: Optional[Iterable[int]]) -> None:
        """Say that the batches offered from now on hold only the groups ``keys`` (``None``: any
        group, the default), until the next call.

        Groups not seen yet arrive now, in ascending order (the shares re-balance: reads the
        device once, here rather than in a training step). From the insert after which every
        group holds its full share, inserts read nothing from the device. A sample of a group
        that was not announced is then kept nowhere (it cannot be seen without a read), and the
        next :meth:`announce` or :meth:`state_dict` raises ``ValueError`` once, withdrawing the
        announcement (what is stored is sound: none of those samples is in it).

        Raises:
            ValueError: a key that is not an int ``>= 0``; samples of groups that were not
                announced were offered under the previous announcement.
        """
        self._end_announcement()
        if keys is None:
            return
        keys = sorted(set(keys))
        if any(isinstance(key, bool) or not isinstance(key, int) or key < 0 for key in keys):
            raise ValueError(f"announce takes the groups' keys as ints >= 0, got {keys!r:.200}")
        new_groups = [key for key in keys if key not in self._group_seen]
        if new_groups:
            self._arrive(new_groups)
        self.announced = frozenset(keys)
        self._insert_on_device_if_full()

    def _end_announcement(self) -> None:
        """Counts back to the host, and the announcement withdrawn (raising if it was broken)."""
        inserts, self._on_device = self._on_device, None
        self.announced = None
        if inserts is None:
            return
        self._group_seen.update(inserts.counts())
        unannounced = int(inserts.unannounced)
        if unannounced:
            raise ValueError(
                f"{type(self).__name__}: {unannounced} sample{'s' if unannounced > 1 else ''} offered while only the "
                f"{self.group_name} {sorted(inserts.keys)} were announced belonged to other {self.group_name}: they were "
                f"kept nowhere. Announce all the {self.group_name} that the batches hold (or None)"
            )

    def _pull_counts(self) -> None:
        """The device's counts of samples offered per group, onto the host (one read)."""
        assert self._on_device is not None
        self._group_seen.update(self._on_device.counts())

    def _insert_on_device_if_full(self) -> None:
        """Move the inserts to the device when groups are announced and every one is full."""
        if self.announced is None or self._on_device is not None or self.capacity == 0 or not self.groups:
            return
        if any(self._held[key] != self.quota(key) for key in self.groups):
            return
        quotas = [self.quota(key) for key in self.groups]
        slots = torch.full((len(self.groups), max(max(quotas), 1)), self.capacity, dtype=torch.long, device=self.device)
        for row, (key, quota) in enumerate(zip(self.groups, quotas)):
            if quota:
                slots[row, :quota] = self._slots_cache[key]
        lookup = torch.full((max(self.groups) + 1,), -1, dtype=torch.long, device=self.device)
        lookup[torch.tensor(self.groups, device=self.device)] = torch.arange(len(self.groups), device=self.device)
        self._on_device = _DeviceInserts(
            keys=list(self.groups),
            lookup=lookup,
            slots=slots,
            quotas=torch.tensor(quotas, device=self.device),
            seen=torch.tensor([self._group_seen[key] for key in self.groups], device=self.device),
            unannounced=torch.zeros((), dtype=torch.long, device=self.device),
        )

    def _add_on_device(self, batch: dict[str, Tensor]) -> None:
        """Store a batch of announced, full groups: every decision on the device, nothing read."""
        inserts = self._on_device
        assert inserts is not None
        keys = batch[self.group_field]
        inside = (keys >= 0) & (keys < inserts.lookup.shape[0])
        group = torch.where(inside, inserts.lookup[keys.clamp(0, inserts.lookup.shape[0] - 1)], -1)
        known = group >= 0
        group = group.clamp(min=0)
        rows = torch.arange(len(inserts.keys), device=self.device)
        members = ((group.unsqueeze(1) == rows) & known.unsqueeze(1)).long()  # (N, groups): not one_hot, which reads on the CPU
        # Each sample's place in its group's stream: the group's count so far, then its rank
        # among the batch's samples of that group (batch order, as one-by-one insertion).
        place = inserts.seen[group] + (members.cumsum(0) * members).sum(1) - 1
        uniform = torch.rand(keys.shape[0], generator=self._generator, device=self.device, dtype=torch.float64)
        local = torch.floor(uniform * (place + 1).to(torch.float64)).long()  # Algorithm R: uniform in [0, place]
        kept = known & (local < inserts.quotas[group])
        slots = torch.where(kept, inserts.slots[group, local.clamp(max=inserts.slots.shape[1] - 1)], self.capacity)
        slots = _last_per_slot(slots, self.capacity)
        for name, values in batch.items():
            self._fields[name][slots] = values
        inserts.seen.add_(members.sum(0))
        inserts.unannounced.add_((~known).sum())

    @override
    def to(self, device: torch.device) -> None:
        """Move the storage to ``device``; an announcement stands."""
        announced = self.announced
        super().to(device)
        if announced is not None and self.announced is None:
            self.announce(announced)

    # ---------------------------------------------------------------------------- quotas
    def quota(self, key: int) -> int:
        """The most samples group ``key`` may hold now (0 for a group never offered)."""
        if key not in self.group_seen:
            return 0
        share, remainder = divmod(self.capacity, len(self.groups))
        return share + int(self.groups.index(key) < remainder)

    def group_sizes(self) -> dict[int, int]:
        """Samples held per group, for every group seen (in order of arrival)."""
        return {key: self._held.get(key, 0) for key in self.groups}

    def slots_of(self, keys: Sequence[int]) -> Tensor:
        """The slots holding the samples of groups ``keys``, in slot order.

        Kept between calls and extended as a group fills, so asking at every step reads nothing
        from the device after a group's first time (its slots move only when a new group arrives
        or a state is loaded).
        """
        parts = [self._cached_slots_of(key) for key in keys]
        if not parts:
            return torch.zeros(0, dtype=torch.long, device=self.device)
        return parts[0] if len(parts) == 1 else torch.sort(torch.cat(parts)).values

    def _cached_slots_of(self, key: int) -> Tensor:
        slots = self._slots_cache.get(key)
        return torch.zeros(0, dtype=torch.long, device=self.device) if slots is None else slots

    def _find_slots(self) -> None:
        """Search storage for every group's slots (one read from the device)."""
        keys = self._fields.get(self.group_field)
        self._slots_cache = {} if keys is None or self.size == 0 else positions_by_key(keys[: self.size])

    # ---------------------------------------------------------------------------- insertion
    def add(self, inputs: Tensor, targets: Tensor, task_ids: Union[Tensor, int], **extras: Tensor) -> None:
        """Offer a batch: new groups first shrink the others' shares, then each group's samples
        enter its own reservoir."""
        self.check_batch(inputs, targets)
        batch = self._batch_fields(inputs, targets, task_ids, extras)
        if self._on_device is not None:
            self._add_on_device(batch)
            self.num_seen += inputs.shape[0]
            return
        groups = list(self._groups_in(batch, task_ids))
        new_groups = [key for key, _ in groups if key not in self.group_seen]
        if new_groups:
            self._arrive(new_groups)
        for key, positions in groups:
            count = inputs.shape[0] if positions is None else positions.shape[0]
            if self.capacity > 0:
                self._add_to_group(key, positions, count, batch)
            self.group_seen[key] += count
        self.num_seen += inputs.shape[0]
        self._insert_on_device_if_full()

    def _arrive(self, new_groups: list[int]) -> None:
        """Groups never seen arrive (in the order given): every share shrinks to its new quota."""
        self.groups.extend(new_groups)
        self.group_seen.update(dict.fromkeys(new_groups, 0))
        self._held.update(dict.fromkeys(new_groups, 0))
        self._shrink_to_quotas()

    def _groups_in(self, batch: dict[str, Tensor], task_ids: Union[Tensor, int]) -> Iterator[tuple[int, Optional[Tensor]]]:
        """Each group the batch holds (ascending key: ties between new groups go by key) and the
        batch positions of its samples (``None``: all of them)."""
        if isinstance(task_ids, int) and self.group_field == "task_ids":
            yield task_ids, None
            return
        yield from positions_by_key(batch[self.group_field]).items()

    def _add_to_group(self, key: int, positions: Optional[Tensor], count: int, batch: dict[str, Tensor]) -> None:
        """Group ``key``'s ``count`` samples (at ``positions`` of the batch; ``None``: all)."""
        held, quota, seen = self._held[key], self.quota(key), self.group_seen[key]
        local = CF.reservoir_slots(seen, count, quota, self._generator, self.device)
        # The group holds min(seen, quota) samples, so a local slot below `held` replaces one of
        # them, one in [held, quota) is the next free slot at the end of storage (in stream order,
        # only while the group is below its quota), and `quota` means kept nowhere.
        free = self.size + local - held
        if held > 0:
            replaced = self._cached_slots_of(key)[local.clamp(max=held - 1)]
            free = torch.where(local < held, replaced, free)
        slots = torch.where(local < quota, free, self.capacity)
        for name, values in batch.items():
            self._fields[name][slots] = values if positions is None else values[positions]
        appended = max(0, min(quota, seen + count) - seen)
        if appended:
            new_slots = torch.arange(self.size, self.size + appended, device=self.device)
            self._slots_cache[key] = torch.cat([self._cached_slots_of(key), new_slots])
            self._held[key] += appended
            self.size += appended

    def _shrink_to_quotas(self) -> None:
        """Every group over its quota keeps a uniform subset of its samples; storage is compacted.
        The groups' slots are then searched anew (this reads the device: once per new group)."""
        self._find_slots()
        keep = torch.ones(self.size, dtype=torch.bool, device=self.device)
        for key, held in self.group_sizes().items():
            excess = held - self.quota(key)
            if excess > 0:
                dropped = self._dropped_on_shrink(key, held, excess)
                keep[self._slots_cache[key][dropped]] = False
                self._held[key] -= excess
        self._compact(keep)

    def _dropped_on_shrink(self, key: int, held: int, excess: int) -> Tensor:
        """Which ``excess`` of group ``key``'s ``held`` samples (positions in its slots, in slot
        order) leave when its quota shrinks: a uniform draw, so that the rest stays a uniform
        sample of the group's stream."""
        return torch.randperm(held, generator=self._generator, device=self.device)[:excess]

    def _compact(self, keep: Tensor) -> None:
        """Keep the stored samples marked in ``keep`` (``(size,)`` bool; ``_held`` already counts
        what stays), in slot order at the front of storage, and search the groups' slots anew."""
        kept = sum(self._held.values())  # counted on the host: no read from the device
        if kept == self.size:
            return
        for storage in self._fields.values():
            storage[:kept] = storage[: self.size][keep]  # a copy: no overlap hazard
        self.size = kept
        self._find_slots()

    # ---------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The stored samples and the groups' counts.

        Raises:
            ValueError: samples of groups that were not announced were offered (:meth:`announce`).
        """
        if self._on_device is not None:
            announced = self.announced
            self._end_announcement()  # the counts, read once; raises if the announcement was broken
            self.announce(announced)
        groups, seen = self.state_names
        return {
            **super().state_dict(),
            groups: torch.tensor(self.groups, dtype=torch.long),
            seen: torch.tensor([self.group_seen[key] for key in self.groups], dtype=torch.long),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output, or a plain reservoir's (pooled DDP memories, older
        checkpoints): then the groups are those stored, in order of first slot, each counted as
        seen in proportion to its share of the memory, and the shares are re-balanced. An
        announcement is withdrawn (announce again for the batches to come)."""
        self._on_device, self.announced = None, None
        super().load_state_dict(state)
        groups, seen = (state.get(name) for name in self.state_names)
        keys = self._fields.get(self.group_field)
        stored = [] if keys is None else keys[: self.size].tolist()
        counts = {key: stored.count(key) for key in dict.fromkeys(stored)}
        if groups is not None and seen is not None:
            self.groups = [int(key) for key in groups.tolist()]
            self.group_seen = dict(zip(self.groups, (int(n) for n in seen.tolist())))
        else:
            self.groups = list(counts)
            scale = self.num_seen / max(len(stored), 1)
            self.group_seen = {key: max(count, round(count * scale)) for key, count in counts.items()}
        self._held = {key: counts.get(key, 0) for key in self.groups}
        self._shrink_to_quotas()
        # A group below its quota has kept all it was offered: an estimated count above what it
        # holds would leave its reservoir a gap, so it counts as offered what it holds.
        for key in self.groups:
            if self._held[key] < min(self.group_seen[key], self.quota(key)):
                self.group_seen[key] = self._held[key]


class ClassBalancedMemory(BalancedMemory):
    """``capacity`` samples split evenly over the classes seen so far, each class a reservoir of
    its own stream (:class:`BalancedMemory` grouped by class label).

    Targets must be class labels (1-D integers).
    """

    group_field = "targets"
    state_names = ("classes", "class_seen")
    group_name = "classes"

    @property
    def classes(self) -> list[int]:
        """Class labels in order of arrival."""
        return self.groups

    @property
    def class_seen(self) -> dict[int, int]:
        """How many samples of each class were offered."""
        return self.group_seen

    def class_sizes(self) -> dict[int, int]:
        """Samples held per class, for every class seen (in order of arrival)."""
        return self.group_sizes()

    def check_batch(self, inputs: Tensor, targets: Tensor) -> None:
        """Raise ``ValueError`` unless ``targets`` are class labels and the batch fits what is stored."""
        if not is_class_labels(targets):
            raise ValueError(
                "a class-balanced memory needs class labels as targets (a 1-D integer tensor), got "
                f"targets of shape {tuple(targets.shape)} and dtype {targets.dtype}"
            )
        super().check_batch(inputs, targets)


class ExemplarMemory(ClassBalancedMemory):
    """``capacity`` chosen exemplars split evenly over the classes seen so far: iCaRL's exemplar
    sets (Rebuffi et al. 2017), and the memory of a rehearsal method built with ``selection=``.

    The same storage and quotas as :class:`ClassBalancedMemory` (``floor`` or ``ceil`` of
    ``M / classes``, re-split as classes arrive); what differs is which samples a class keeps.
    Samples are not offered one batch at a time but a task's candidates at once, each with its
    ``rank`` (its place in its class's selection order, 0 chosen first: herding's pick order, or
    a random permutation) through :meth:`add_ranked`, and a class keeps its ``quota`` lowest
    ranks. When new classes shrink the quotas every class keeps its lowest ranks, the prefix of
    its selection (iCaRL's ReduceExemplarSet); with random ranks that prefix is a uniform subset.
    The rank is stored with each sample as the extra field ``"ranks"``.
    """

    rank_field = "ranks"

    def add(self, inputs: Tensor, targets: Tensor, task_ids: Union[Tensor, int], **extras: Tensor) -> None:
        """Refused: an exemplar memory keeps ranked candidates (:meth:`add_ranked`)."""
        raise TypeError(
            "ExemplarMemory keeps chosen exemplars: offer a task's candidates with their selection ranks through "
            "add_ranked(inputs, targets, task_ids, ranks) (select_exemplars does), not batch by batch with add()"
        )

    def quotas_after(self, classes: Sequence[int]) -> dict[int, int]:
        """Each class's quota once ``classes`` have been offered: those held and the new ones
        (which arrive in ascending order), as :meth:`add_ranked` will set them."""
        arrival = self.groups + sorted(set(int(key) for key in classes) - set(self.groups))
        if not arrival:
            return {}
        share, remainder = divmod(self.capacity, len(arrival))
        return {key: share + int(k < remainder) for k, key in enumerate(arrival)}

    def random_ranks(self, count: int) -> Tensor:
        """A random permutation of ``0 .. count-1`` from the memory's generator (random selection:
        seeded with the memory, resumed by its checkpoint)."""
        return torch.randperm(count, generator=self._generator, device=self.device)

    def add_ranked(
        self, inputs: Tensor, targets: Tensor, task_ids: Union[Tensor, int], ranks: Tensor, **extras: Tensor
    ) -> None:
        """Offer candidates with their selection ranks: each class in ``targets`` keeps its
        ``quota`` lowest-ranked candidates (ties by position); a class already held is selected
        anew from these candidates alone (its old exemplars leave: ranks of two selections do not
        compare). New classes first shrink the others to their lowest ranks.

        Args:
            inputs: the candidates' inputs.
            targets: their class labels.
            task_ids: their task ids, per sample or one int.
            ranks: ``(N,)`` integers, each candidate's place in its class's selection order.
            extras: further per-sample fields, as for :meth:`ReservoirMemory.add`.

        Raises:
            ValueError: targets that are not class labels, ranks that are not ``(N,)`` integers,
                or shapes and dtypes unlike the stored samples' (nothing is changed then).
        """
        self.check_batch(inputs, targets)
        if not is_class_labels(ranks) or ranks.shape[0] != inputs.shape[0]:
            raise ValueError(
                f"ranks must be a 1-D integer tensor with one rank per candidate ({inputs.shape[0]}), got ranks of "
                f"shape {tuple(ranks.shape)} and dtype {ranks.dtype}"
            )
        batch = self._batch_fields(inputs, targets, task_ids, {**extras, self.rank_field: ranks.to(torch.long)})
        groups = positions_by_key(batch[self.group_field])
        self._forget(key for key in groups if key in self.group_seen)
        new_groups = [key for key in groups if key not in self.group_seen]
        self.groups.extend(new_groups)
        self._held.update(dict.fromkeys(new_groups, 0))
        for key, positions in groups.items():
            self.group_seen[key] = positions.shape[0]
        if self.capacity > 0:
            self._shrink_to_quotas()
            for key, positions in groups.items():
                self._append_lowest_ranks(key, positions, batch)
        self.num_seen += inputs.shape[0]

    def _forget(self, keys: Iterator[int]) -> None:
        """Remove every stored sample of the classes ``keys`` (selected anew)."""
        keys = [key for key in keys if self._held.get(key, 0) > 0]
        if not keys:
            return
        self._find_slots()
        keep = torch.ones(self.size, dtype=torch.bool, device=self.device)
        for key in keys:
            keep[self._slots_cache[key]] = False
            self._held[key] = 0
        self._compact(keep)

    def _append_lowest_ranks(self, key: int, positions: Tensor, batch: dict[str, Tensor]) -> None:
        """Class ``key`` (held empty) takes its ``quota`` lowest-ranked candidates, at the end of storage."""
        order = torch.sort(batch[self.rank_field][positions], stable=True).indices[: self.quota(key)]
        chosen = positions[order]
        count = chosen.shape[0]
        slots = torch.arange(self.size, self.size + count, device=self.device)
        for name, values in batch.items():
            self._fields[name][slots] = values[chosen]
        self._slots_cache[key] = slots
        self._held[key] = count
        self.size += count

    @override
    def _dropped_on_shrink(self, key: int, held: int, excess: int) -> Tensor:
        """The class's ``excess`` highest ranks (the end of its selection order) leave."""
        ranks = self._fields[self.rank_field][self._slots_cache[key]]
        return torch.sort(ranks, stable=True).indices[held - excess :]


class TaskBalancedMemory(BalancedMemory):
    """``capacity`` samples split evenly over the tasks seen so far, each task a reservoir of its
    own stream (:class:`BalancedMemory` grouped by task id): the episodic memory of GEM and A-GEM,
    where every earlier task keeps an equal share."""

    group_field = "task_ids"
    state_names = ("tasks", "task_seen")
    group_name = "tasks"


class _DeviceInserts(NamedTuple):
    """The bookkeeping of a balanced memory's inserts on the device (announced, full groups)."""

    #: The groups' keys in order of arrival (row ``g`` of the tensors below is ``keys[g]``).
    keys: list[int]
    #: key -> row (``-1``: not announced), for keys ``0 .. max(keys)``.
    lookup: Tensor
    #: ``(groups, max quota)``: row ``g`` holds group ``g``'s slots, padded with the spare row.
    slots: Tensor
    #: Each group's quota, and how many of its samples were offered (updated by every insert).
    quotas: Tensor
    seen: Tensor
    #: Samples offered whose group was not announced (kept nowhere).
    unannounced: Tensor

    def counts(self) -> dict[int, int]:
        """``{key: samples offered}`` (reads the device once)."""
        return dict(zip(self.keys, self.seen.tolist()))


def _last_per_slot(slots: Tensor, spare: int) -> Tensor:
    """``slots`` with each slot below ``spare`` kept for its last sample only (batch order: the
    later sample overwrites the earlier one, as one-by-one insertion would), the rest ``spare``."""
    ordered, order = torch.sort(slots, stable=True)
    last_of_run = torch.ones_like(ordered, dtype=torch.bool)
    last_of_run[:-1] = ordered[1:] != ordered[:-1]
    kept = torch.empty_like(last_of_run).scatter_(0, order, last_of_run)
    return torch.where(kept, slots, spare)


def is_class_labels(targets: Tensor) -> bool:
    """Whether ``targets`` is a 1-D tensor of integer class labels."""
    return targets.dim() == 1 and not (targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool)


def positions_by_key(keys: Tensor) -> dict[int, Tensor]:
    """``{key: positions of keys equal to it}``, ascending keys and positions, reading ``keys``
    from the device once (sorted, so that each key's positions are one run)."""
    ordered, order = torch.sort(keys, stable=True)
    runs = [(key, len(list(run))) for key, run in itertools.groupby(ordered.tolist())]
    return dict(zip((key for key, _ in runs), order.split([count for _, count in runs])))


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)
