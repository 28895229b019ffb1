"""What every method with a memory of past samples shares: the memory, its API, its checkpoints.

Experience replay, Dark Experience Replay, ER-ACE, A-GEM and GEM differ in what they do with
remembered samples; the memory itself (a reservoir, or one balanced over classes or tasks), the
public ``add_to_memory`` / ``get_replay_batch``, the state under DDP (one memory per rank, all of
them in the checkpoint) and the checks on what may be stored are this one base class.

With ``selection=`` (``"herding"``, ``"closest"``, ``"random"``) the memory is an
:class:`~neurenix.continual.memory.ExemplarMemory` filled at each task's end from the task's data
(:func:`~neurenix.continual.exemplars.select_exemplars`) instead of from the stream.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
import weakref
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from neurenix.continual import _checks
from neurenix.continual._checks import (
    any_non_finite,
    check_batch,
    check_choice,
    check_finite_samples,
    check_int,
    check_model,
    check_task_id,
)
from neurenix.continual.base import default_seed
from neurenix.continual.callback import (
    ContinualCallback,
    continual_methods,
    split_batch,
)
from neurenix.continual.distributed import all_gather_objects, rank_and_world_size
from neurenix.continual.exemplars import STRATEGIES, FeatureExtractor, select_exemplars
from neurenix.continual.memory import (
    BalancedMemory,
    ExemplarMemory,
    ReplayBatch,
    ReservoirMemory,
    is_class_labels,
    stored_fields,
)

__all__ = ["OFFERS", "AppendsReplayedSamples", "RehearsalMethod", "redistributed_memory", "with_replayed"]

#: Values of ``offer=``: which training batches of a Trainer's fit are offered to the memory.
#: ``"every_epoch"``: every batch of every epoch; ``"once"``: those of the task's first epoch only.
OFFERS = ("every_epoch", "once")


class RehearsalMethod(ContinualCallback):
    """A continual-learning method that keeps a fixed-size memory of samples seen so far.

    Subclasses choose the memory (``memory_class``) and what a training step does with it. One
    rehearsal method per ``Trainer``: two would each keep a memory of the same stream and add
    their terms to the same step.

    ``offer`` says which training batches a Trainer's fit offers to a stream memory:
    ``"every_epoch"`` (every batch of every epoch: with ``E`` epochs each sample is offered ``E``
    times), or ``"once"`` (the batches of the task's first epoch: each training sample of the task
    is offered once, later epochs replay and offer nothing). With ``"once"``, each sample of the
    stream (every task's samples, once each) is in a reservoir memory with probability
    ``min(1, memory_size / samples offered so far)``. The epoch a task began in is part of the
    state, so a run resumed in a later epoch of the task offers nothing, as the uninterrupted run
    did. Under DDP each process offers its own shard of the first epoch to its own memory.
    Standalone, the caller offers (``add_to_memory``, or ``train_step`` where it stores its
    batch): ``offer`` does not apply.
    """

    #: Whether stored targets must be class labels (the memory terms are cross-entropies).
    needs_class_labels = False
    #: Whether ``train_step`` offers its batch to the memory itself (then ``add_to_memory`` is
    #: for samples that were not trained on). ExperienceReplay leaves it to the caller, as the
    #: Neurenix continual-learning API's replay example does.
    remembers_training_batches = True

    def __init__(
        self,
        model: torch.nn.Module,
        memory_size: int,
        device: Optional[torch.device],
        seed: Optional[int],
        memory_class: type[ReservoirMemory] = ReservoirMemory,
        *,
        selection: Optional[str] = None,
        feature_extractor: Union[None, torch.nn.Module, str] = None,
        offer: str = "every_epoch",
    ) -> None:
        check_model(model)
        self.memory_size = check_int("memory_size", memory_size, minimum=0)
        seed = default_seed(type(self).__name__) if seed is None else check_int("seed", seed, minimum=0)
        self.offer = check_choice("offer", offer, OFFERS)
        self.selection, self._extractor = _exemplar_selection(model, selection, feature_extractor)
        if self.selection is not None and self.offer != "every_epoch":
            raise ValueError(
                f"offer={self.offer!r} says which training batches enter a memory filled from the stream; with "
                f"selection={self.selection!r} exemplars are chosen from each task's data at its end: leave offer "
                "at 'every_epoch'"
            )
        if self.selection is not None:
            memory_class = ExemplarMemory
            self.needs_class_labels = True  # exemplars are chosen per class
        super().__init__(model, device)
        self.memory = memory_class(self.memory_size, self.device, seed)
        #: The door (``"train_step"`` or ``"add_to_memory"``) that stored the last tensor of inputs,
        #: and that tensor: the other door does not store it a second time.
        self._last_stored: Optional[tuple[str, weakref.ref]] = None
        #: The inputs the caller gave the ``train_step`` in progress (before any move to the device).
        self._step_inputs: Optional[Tensor] = None
        #: The task id that every training batch of the running fit carries, where the data
        #: module says so (then the memory needs not read the batch's task ids from the device).
        self._fit_batches_task: Optional[int] = None
        #: The trainer's epoch when the active task's first fit began (``None``: not under a
        #: Trainer yet); with ``offer="once"`` only that epoch's batches are offered.
        self._task_first_epoch: Optional[int] = None
        #: Whether the running epoch's training batches are offered to the memory.
        self._offering = True
        #: ``add_to_memory`` calls on an accelerator whose samples held NaN or infinities, counted
        #: on the device and raised at the next point that synchronizes anyway.
        self._non_finite = NonFiniteOffers()
        #: Whether every DDP rank checks the records together (inside a Lightning fit).
        self._ranks_check_together = False

    def train_step(self, optimizer: torch.optim.Optimizer, loss_fn: Any, inputs: Tensor, targets: Tensor, task_id: int) -> Tensor:
        check_batch(inputs, targets)
        if self.remembers_training_batches:  # refused before the step, not when the batch is stored
            self.check_targets(targets)
            self.memory.check_batch(inputs, targets)
        self._step_inputs = inputs
        try:
            return super().train_step(optimizer, loss_fn, inputs, targets, task_id)
        finally:
            self._step_inputs = None

    train_step.__doc__ = ContinualCallback.train_step.__doc__

    # ---------------------------------------------------------------------------- the continual-learning API
    def add_to_memory(self, inputs: Tensor, targets: Tensor, task_id: int) -> None:
        """Offer a batch of samples of task ``task_id`` to the memory.

        Methods whose ``train_step`` remembers its batch itself (all but ExperienceReplay) store
        a tensor once when both ``train_step`` and ``add_to_memory`` are given it, one right after
        the other, in either order (a warning): the Neurenix continual-learning API's replay loop
        calls both.

        Samples holding NaN or infinite values (in ``inputs``, or in floating-point ``targets``)
        would be kept and replayed until replaced. On the CPU, where reading values costs nothing,
        such a batch is refused at once, before anything is stored. On an accelerator the check
        runs on the device without making the host wait (no synchronization per call): the batch
        is stored, the call is counted on the device, and the ``ValueError`` comes at the next
        point that synchronizes anyway: the task's end (its consolidation), :meth:`state_dict`
        (so no checkpoint ever holds such a memory: the last one written is clean), and under a
        Trainer the end of the fit and each checkpoint. It names the first such call (its number
        among this task's ``add_to_memory`` calls), its task and how many calls there were; the
        memory then holds those samples: resume from the last checkpoint (docs/reliability.md).
        Training batches that a Trainer offers to the memory are not scanned, as no training
        step is.

        Raises:
            TypeError / ValueError: not tensors, different sample counts, a non-int task id,
                targets that are not class labels where the method needs them, or shapes/dtypes
                that differ from the samples the memory already holds.
            ValueError: on the CPU, ``inputs`` (or floating-point ``targets``) hold NaN or
                infinite values (nothing is stored then); on an accelerator, at the next
                synchronizing point after such a call (see above).
        """
        check_batch(inputs, targets)
        task_id = check_task_id(task_id)
        if self.selection is not None:
            raise ValueError(
                f"{type(self).__name__}(selection={self.selection!r}) chooses its exemplars from each task's data at the "
                f"task's end, not from batches offered with add_to_memory: give the task's data with "
                f"register_task({task_id}, dataloader) (under a Trainer, the fit's training data is used)"
            )
        if self.remembers_training_batches and self._stored_by("train_step", inputs):
            self._warn_stored_twice("add_to_memory", "train_step")
            self._last_stored = None  # a later offer of the same tensor is a new one
            return
        self.check_targets(targets)
        deferred = not _checks.reads_cost_nothing(inputs)
        if not deferred:
            check_finite_samples("inputs", inputs)
            check_finite_samples("targets", targets)
        self.memory.check_batch(inputs, targets)
        self.prepare_for_device()
        call = self._non_finite.count_call(task_id)
        if deferred:
            self._non_finite.note(any_non_finite(inputs, targets), call, task_id)
        task_ids = torch.full((inputs.shape[0],), task_id, dtype=torch.long, device=self.memory.device)
        self._remember(inputs.detach(), targets.detach(), task_id, **self._extras_of(inputs, task_ids))
        self._last_stored = ("add_to_memory", weakref.ref(inputs))

    def announce_classes(self, classes: Optional[Sequence[int]]) -> None:
        """Say which classes the batches offered to the memory hold until the task ends (``None``:
        any), so that a class-balanced memory (``balance="classes"``, GDumb's) stores batches
        without reading the device once every class holds its share: one host-device
        synchronization less per step on a GPU. Other memories need no announcement (it is
        ignored). Under a Trainer the fit's training data announces its classes itself (a
        :class:`~neurenix.data.TaskDataset` or :class:`~neurenix.data.ConcatTaskDataset`).

        Samples of a class that was not announced are kept nowhere, and the task's end (or the
        next :meth:`state_dict`) raises ``ValueError``.

        Raises:
            ValueError: a class that is not an int ``>= 0``.
        """
        if classes is not None:
            classes = list(classes)
            if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in classes):
                raise ValueError(f"classes must be class labels (ints >= 0), got {classes!r:.200}")
        if _announces_classes(self.memory):
            self.prepare_for_device()
            self.memory.announce(classes)  # type: ignore[attr-defined]

    def get_replay_batch(self, batch_size: int) -> ReplayBatch:
        """``min(batch_size, len(memory))`` distinct remembered samples: ``(inputs, targets, task_ids)``.

        Raises:
            ValueError: ``batch_size < 1`` or the memory is empty.
        """
        batch_size = check_int("batch_size", batch_size, minimum=1)
        self.prepare_for_device()
        return self.memory.sample(batch_size)

    def check_targets(self, targets: Tensor) -> None:
        """Refuse targets the method cannot learn from (class labels where it needs them)."""
        if self.needs_class_labels and not is_class_labels(targets):
            why = "its exemplars are chosen per class" if self.selection is not None else "its memory terms are cross-entropies"
            raise ValueError(
                f"{type(self).__name__} needs class labels as targets (a 1-D integer tensor: {why}), got targets "
                f"of shape {tuple(targets.shape)} and dtype {targets.dtype}"
            )

    # ---------------------------------------------------------------------------- storing once
    def _claim_step_batch(self, inputs: Tensor) -> bool:
        """Whether ``train_step``'s batch (``inputs``, as the model got them) is to be stored now:
        not when ``add_to_memory`` has just stored that tensor (a warning)."""
        given = self._step_inputs if self._step_inputs is not None else inputs
        if self._stored_by("add_to_memory", given):
            self._warn_stored_twice("train_step", "add_to_memory")
            self._last_stored = None
            return False
        self._last_stored = ("train_step", weakref.ref(given))
        return True

    def _stored_by(self, door: str, inputs: Tensor) -> bool:
        last = self._last_stored
        return last is not None and last[0] == door and last[1]() is inputs

    def _warn_stored_twice(self, door: str, other: str) -> None:
        warn_at_caller(
            f"{type(self).__name__}.{door} got the tensor of inputs that {other} has just stored: it is not "
            "stored twice. train_step stores each batch it trains on; call add_to_memory only for samples "
            "that are not trained with train_step"
        )

    # ---------------------------------------------------------------------------- shared core
    def _remember(self, inputs: Tensor, targets: Tensor, task_ids: Union[Tensor, int], **extras: Tensor) -> None:
        """Offer samples the method has already checked (a training batch) to the memory; with
        ``selection``, nothing enters during a task (exemplars are chosen at its end)."""
        if self.selection is None:
            self.memory.add(inputs, targets, task_ids, **extras)

    def _consolidate(self, task_id: int, data: Any) -> None:
        self.raise_non_finite_offers()  # before the task ends: its state stays as it was
        self.announce_classes(None)  # the task's announcement ends with it (raises if broken)
        super()._consolidate(task_id, data)
        if self.selection is not None:
            self._select_exemplars(task_id, data)

    def _select_exemplars(self, task_id: int, data: Any) -> None:
        """The task's exemplars, chosen from its data at the parameters it ended with."""
        if data is None:
            warn_at_caller(
                f"{type(self).__name__}(selection={self.selection!r}) ended task {task_id} without its data: no "
                f"exemplar of it was kept. Give the data with register_task({task_id}, dataloader)"
            )
            return
        assert self._extractor is not None  # set with selection
        self.prepare_for_device()
        select_exemplars(
            self.memory,  # type: ignore[arg-type]
            self._extractor,
            data,
            task_id,
            self.selection,
            convert_inputs=self._convert_inputs,
            extras_of=self._extras_of if self._has_extras() else None,
        )

    def _has_extras(self) -> bool:
        """Whether :meth:`_extras_of` stores fields (overridden: DER's logits)."""
        return type(self)._extras_of is not RehearsalMethod._extras_of

    def _extras_of(self, inputs: Tensor, task_ids: Tensor) -> dict[str, Tensor]:
        """Further fields to store with samples given to :meth:`add_to_memory` (DER: their logits)."""
        return {}

    def _task_ids_of(self, inputs: Tensor, task_ids: Optional[Tensor]) -> Union[Tensor, int]:
        """Each sample's task id: the batch's own, else the task being trained (an int: one id
        for the whole batch, which the memory needs not read from the device)."""
        if task_ids is not None:
            return task_ids if self._fit_batches_task is None else self._fit_batches_task
        if self.active_task is None:
            raise RuntimeError(f"{type(self).__name__} got a training batch outside a task (on_train_start did not run)")
        return self.active_task

    def _begin_task(self, task_id: int) -> None:
        super()._begin_task(task_id)
        self._task_first_epoch = None

    def raise_non_finite_offers(self) -> None:
        """Raise the ``ValueError`` that :meth:`add_to_memory` deferred on an accelerator, if any
        of its calls gave NaN or infinite values (this reads the device: once, where the caller
        synchronizes anyway).

        Inside a Lightning fit under DDP every rank reaches these points together (a task's end,
        each checkpoint's ``state_dict``), so the ranks compare their records and all raise: one
        rank raising alone would leave the others waiting in the checkpoint's collectives.
        """
        summaries = None
        if self._ranks_check_together and rank_and_world_size()[1] > 1:
            summaries = all_gather_objects(self._non_finite.summary())
        self._non_finite.raise_if_any(type(self).__name__, summaries)

    def _remember_batch(self, batch: Any) -> None:
        """Offer a Lightning training batch's samples to the memory (with ``offer="once"``, in
        the task's first epoch only)."""
        if not self._offering:
            return
        inputs, targets, task_ids = split_batch(batch)
        self._remember(inputs.detach(), targets.detach(), self._task_ids_of(inputs, task_ids))

    @override
    def prepare_for_device(self) -> None:
        self.memory.to(self.device)

    # ---------------------------------------------------------------------------- Lightning side
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        others = [m for m in continual_methods(trainer) if isinstance(m, RehearsalMethod) and m is not self]
        if stage == "fit" and others:
            raise ValueError(
                f"{type(self).__name__} and {type(others[0]).__name__} are on one Trainer: each keeps its own "
                "memory of the same stream and rehearses it in the same steps. Use one rehearsal method "
                "(ExperienceReplay, DarkExperienceReplay, ERACE, AGEM or GEM); each combines with EWC, L2, "
                "SynapticIntelligence and KnowledgeDistillation"
            )

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._ranks_check_together = True  # every rank runs the fit's hooks and checkpoints
        super().on_fit_start(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_fit_end(trainer, pl_module)
        self._ranks_check_together = False

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_train_start(trainer, pl_module)
        self._fit_batches_task = _task_of_every_batch(trainer)
        self.announce_classes(_classes_of_every_batch(trainer))
        if self._task_first_epoch is None:  # the task's first fit (a resumed one has it from the state)
            self._task_first_epoch = trainer.current_epoch
        # Resumed inside an epoch, Lightning goes on with it without on_train_epoch_start.
        self._offering = self._offers_in_epoch(trainer.current_epoch)

    @override
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._offering = self._offers_in_epoch(trainer.current_epoch)

    def _offers_in_epoch(self, epoch: int) -> bool:
        """Whether the training batches of the trainer's ``epoch`` are offered to the memory: the
        trainer's epoch, as Lightning restores it on resume, says whether it is the task's first."""
        return self.offer == "every_epoch" or epoch == self._task_first_epoch

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.raise_non_finite_offers()
        self._fit_batches_task = None
        self._offering = True
        super().on_train_end(trainer, pl_module)

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._ranks_check_together = False  # no collective after a failure: ranks may not all be here
        with contextlib.suppress(ValueError):  # the fit failed already: its error is the one to see
            self.announce_classes(None)
        self._fit_batches_task = None  # a later train_step's batches are not this fit's
        self._offering = True
        super().on_exception(trainer, pl_module, exception)

    @override
    def check_task_batch(self, batch: Any) -> None:
        self.check_targets(split_batch(batch)[1])

    # ---------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The state (:meth:`ContinualMethod.state_dict`), the memory's included.

        Raises:
            ValueError: an :meth:`add_to_memory` call on an accelerator gave NaN or infinite
                values: no state holding such a memory is returned.
        """
        self.raise_non_finite_offers()
        return {**super().state_dict(), "memory": self.memory.state_dict(), "task_first_epoch": self._task_first_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._non_finite = NonFiniteOffers()  # the loaded memory is what a clean state_dict held
        self._task_first_epoch = state_dict.get("task_first_epoch")  # older checkpoints: the resumed fit's
        self.memory.device = self.device
        per_rank = state_dict.get("memory_per_rank")
        rank, world_size = rank_and_world_size()
        if per_rank is None:
            self.memory.load_state_dict(state_dict.get("memory", {}))
        elif len(per_rank) == world_size:  # the same processes again: each gets its own memory back
            self.memory.load_state_dict(per_rank[rank])
        else:
            self.memory.load_state_dict(redistributed_memory(per_rank, rank, world_size, self.memory.capacity))

    @override
    def on_save_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]) -> None:
        self.raise_non_finite_offers()  # Lightning asked state_dict already; a subclass may not
        # Under DDP every rank keeps its own memory of its own shard of the stream, and only
        # rank 0 writes the checkpoint: gather all of them into it, so that nothing is lost.
        if rank_and_world_size()[1] == 1:
            return
        states = all_gather_objects(_on_cpu(self.memory.state_dict()))
        checkpoint["callbacks"][self.state_key]["memory_per_rank"] = states


class NonFiniteOffers:
    """The ``add_to_memory`` calls on an accelerator whose samples held NaN or infinities,
    counted on the device (no synchronization per call) and raised where the host reads anyway.

    The host counts each task's calls; the device keeps how many calls were bad and the first
    bad one's number and task.
    """

    def __init__(self) -> None:
        #: Calls so far per task id (on the host: the call numbers the message names).
        self.calls: dict[int, int] = {}
        #: ``[bad calls, the first bad call's number, its task]`` on the device (``None``: none noted).
        self._record: Optional[Tensor] = None

    def count_call(self, task_id: int) -> int:
        """The number (from 1) of this ``add_to_memory`` call among task ``task_id``'s."""
        self.calls[task_id] = self.calls.get(task_id, 0) + 1
        return self.calls[task_id]

    def note(self, bad: Tensor, call: int, task_id: int) -> None:
        """Fold call ``call`` of task ``task_id``, bad where the 0-d bool ``bad`` says, into the record."""
        record = self._record
        if record is None:  # filled on the device: not even a copy from the host
            record = torch.full((3,), -1, dtype=torch.long, device=bad.device)
            record[0] = 0
        elif record.device != bad.device:  # samples from another device (rare): the record follows
            record = record.to(bad.device)
        first = bad & (record[0] == 0)
        self._record = torch.stack([
            record[0] + bad.to(torch.long),
            torch.where(first, call, record[1]),
            torch.where(first, task_id, record[2]),
        ])

    def summary(self) -> Optional[tuple[int, int, int, str]]:
        """``(bad calls, the first's number, its task, device type)``, ``None`` if no call was bad
        (reads the record: one synchronization)."""
        if self._record is None:
            return None
        bad, call, task_id = self._record.tolist()
        return (bad, call, task_id, self._record.device.type) if bad else None

    def raise_if_any(self, owner: str, summaries: Optional[list[Optional[tuple[int, int, int, str]]]] = None) -> None:
        """Raise ``ValueError`` if a noted call was bad: this process's, or any of ``summaries``
        (every DDP rank's :meth:`summary`, in rank order: then every rank raises, naming the first
        rank that got such values, and none is left waiting in a collective)."""
        summaries = [self.summary()] if summaries is None else summaries
        bad = [(rank, summary) for rank, summary in enumerate(summaries) if summary is not None]
        if not bad:
            return
        rank, (calls, call, task_id, device) = bad[0]
        where = f" on rank {rank}" if len(summaries) > 1 else ""
        raise ValueError(
            f"{owner}.add_to_memory got NaN or infinite values in {calls} call{'s' if calls > 1 else ''} on "
            f"{device}{where}, the first being call {call} of task {task_id} (checked on the device without waiting "
            "for it, and raised here, at the next point that synchronizes): the memory holds those samples and would "
            "replay them. Find where the values come from, and resume from the last checkpoint (no checkpoint is "
            "written with them)"
        )


class AppendsReplayedSamples:
    """For a rehearsal method that appends ``round(replay_ratio · B)`` remembered samples to each
    batch of ``B`` (ExperienceReplay, iCaRL, BiC); placed before :class:`RehearsalMethod` in the
    bases. :meth:`_replayed` says which samples a step draws."""

    replay_ratio: float
    memory: ReservoirMemory

    def replay_count(self, batch_size: int) -> int:
        """How many samples a step on ``batch_size`` new ones replays: ``round(replay_ratio · batch_size)``."""
        return round(self.replay_ratio * batch_size)

    def _replayed(self, count: int) -> Optional[ReplayBatch]:
        """``count`` samples drawn from the non-empty memory for a step (``None``: none to replay)."""
        return self.memory.sample(count)

    def extend_batch(
        self, inputs: Tensor, targets: Tensor, task_ids: Optional[Tensor]
    ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        count = self.replay_count(inputs.shape[0])
        replayed = None if count == 0 or len(self.memory) == 0 else self._replayed(count)
        if replayed is None:
            return inputs, targets, task_ids
        return with_replayed(inputs, targets, task_ids, replayed)


_PACKAGE = str(Path(__file__).resolve().parents[1])


def _exemplar_selection(
    model: torch.nn.Module, selection: Optional[str], feature_extractor: Union[None, torch.nn.Module, str]
) -> tuple[Optional[str], Optional[FeatureExtractor]]:
    """``selection`` checked, and the features it ranks by (``None`` without selection).

    Raises:
        ValueError: an unknown strategy; herding or closest without ``feature_extractor``; a
            ``feature_extractor`` without ``selection``, or one that is not in ``model``.
    """
    if selection is None:
        if feature_extractor is not None:
            raise ValueError(
                "feature_extractor is used by exemplar selection only: give selection='herding' or 'closest' "
                "with it (selection=None fills the memory from the stream)"
            )
        return None, None
    check_choice("selection", selection, STRATEGIES)
    if feature_extractor is None:
        if selection != "random":
            raise ValueError(
                f"selection={selection!r} ranks samples by their features: give feature_extractor= (a submodule of "
                "the model, e.g. model.backbone, or its name)"
            )
        feature_extractor = model  # random selection runs no forward
    return selection, FeatureExtractor(model, feature_extractor)


def with_replayed(
    inputs: Tensor, targets: Tensor, task_ids: Optional[Tensor], replayed: ReplayBatch
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """The batch with ``replayed`` samples appended, each part on its batch part's device (task
    ids only where the batch has them)."""
    inputs = torch.cat([inputs, replayed.inputs.to(inputs.device)])
    targets = torch.cat([targets, replayed.targets.to(targets.device)])
    if task_ids is not None:
        task_ids = torch.cat([task_ids, replayed.task_ids.to(task_ids.device, task_ids.dtype)])
    return inputs, targets, task_ids


def _task_of_every_batch(trainer: "pl.Trainer") -> Optional[int]:
    """The task id in every training batch of this fit, where the data says so without reading a
    batch: the fit's training loader serves a :class:`~neurenix.data.TaskDataset` (one task id for
    all its samples, as a :class:`~neurenix.data.TaskSequenceDataModule` serves each task), or a
    :class:`~neurenix.data.ConcatTaskDataset` whose members all have one task id; else ``None``.

    With more than one id, each batch's ids stay a tensor: a reservoir stores them as they are
    (no read), while a task-balanced memory (A-GEM's, GEM's) groups samples by task on the host,
    which reads the batch's ids once per insert.
    """
    from neurenix.data import ConcatTaskDataset, TaskDataset  # neurenix.data imports neurenix.continual

    dataset = getattr(trainer.train_dataloader, "dataset", None)
    if isinstance(dataset, TaskDataset) and dataset.with_task_ids:
        return dataset.task_id
    if isinstance(dataset, ConcatTaskDataset) and dataset.with_task_ids and len(set(dataset.task_ids)) == 1:
        return dataset.task_ids[0]
    return None


def _classes_of_every_batch(trainer: "pl.Trainer") -> Optional[list[int]]:
    """The classes of the fit's training data, where the data says them (a
    :class:`~neurenix.data.TaskDataset` or :class:`~neurenix.data.ConcatTaskDataset`: their
    ``classes``, read once at the fit's start); else ``None``."""
    from neurenix.data import ConcatTaskDataset, TaskDataset  # neurenix.data imports neurenix.continual

    dataset = getattr(trainer.train_dataloader, "dataset", None)
    if not isinstance(dataset, (TaskDataset, ConcatTaskDataset)) or not is_class_labels(dataset.targets):
        return None
    classes = dataset.classes
    return classes if all(c >= 0 for c in classes) else None


def _announces_classes(memory: ReservoirMemory) -> bool:
    """Whether ``memory`` is balanced over classes and filled from the stream (its inserts can
    be told the classes to come)."""
    return isinstance(memory, BalancedMemory) and memory.group_field == "targets" and not isinstance(memory, ExemplarMemory)


def warn_at_caller(message: str) -> None:
    """``warnings.warn`` pointing at the first line outside neurenix (the user's call)."""
    frame, level = sys._getframe(0), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


def _on_cpu(state: dict[str, Any]) -> dict[str, Any]:
    return {key: value.cpu() if isinstance(value, Tensor) else value for key, value in state.items()}


def redistributed_memory(per_rank: list[dict[str, Any]], rank: int, world_size: int, capacity: int) -> dict[str, Any]:
    """Rank ``rank``'s memory when a run saved by ``len(per_rank)`` processes resumes on ``world_size``.

    The saved samples (every stored field) are pooled and dealt out in turn (``rank::world_size``),
    so nothing is dropped unless a rank's share exceeds its capacity (then a seeded uniform subset
    is kept); each rank counts an equal share of the stream seen so far. The sampling generators
    cannot be carried over between different numbers of processes: they restart from the saved seed.
    """
    holding = [state for state in per_rank if stored_fields(state)]
    stored = [stored_fields(state) for state in holding]
    if not stored:
        return {"num_seen": 0, "seed": per_rank[0].get("seed", 0)}
    pooled = {name: torch.cat([fields[name] for fields in stored])[rank::world_size] for name in stored[0]}
    seed = int(per_rank[0]["seed"]) + rank
    if pooled["inputs"].shape[0] > capacity:
        keep = torch.randperm(pooled["inputs"].shape[0], generator=torch.Generator().manual_seed(seed))[:capacity]
        pooled = {name: value[keep] for name, value in pooled.items()}
    num_seen = sum(int(state["num_seen"]) for state in per_rank) // world_size
    extra_fields = list(holding[0].get("extra_fields", []))
    return {**pooled, "extra_fields": extra_fields, "num_seen": max(num_seen, pooled["inputs"].shape[0]), "seed": seed}
