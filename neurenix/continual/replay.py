"""Experience replay with a reservoir memory (Chaudhry et al. 2019, "On Tiny Episodic Memories"),
or a class-balanced one (each class an equal share, each share a reservoir of its class)."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from typing_extensions import override

from neurenix.continual._checks import check_choice, check_int, check_model, check_real
from neurenix.continual.callback import join_batch, split_batch
from neurenix.continual.memory import ClassBalancedMemory, ReplayBatch, ReservoirMemory
from neurenix.continual.rehearsal import OFFERS, AppendsReplayedSamples, RehearsalMethod, redistributed_memory

__all__ = ["BALANCES", "OFFERS", "ExperienceReplay", "ReplayBatch", "redistributed_memory"]

#: Values of ``ExperienceReplay(balance=...)`` besides ``None`` (one reservoir over the whole stream).
BALANCES = ("classes",)


class ExperienceReplay(AppendsReplayedSamples, RehearsalMethod):
    """Train on new samples together with samples remembered from the whole stream so far.

    The memory keeps ``memory_size`` samples by reservoir sampling, so every sample offered
    (``add_to_memory``, or the training batches under a Trainer: see ``offer``) is in memory with
    the same probability, ``min(1, memory_size / samples offered so far)``. Each training step appends ``round(replay_ratio · batch_size)`` distinct samples
    drawn uniformly from memory to the new ones (fewer while the memory holds fewer).

    Args:
        model: the network being trained.
        memory_size: samples kept, ``>= 0`` (0 turns replay off).
        replay_ratio: replayed samples per new sample, ``>= 0``.
        device: where the memory lives; ``None`` follows the model.
        seed: seeds the memory's sampling; ``None`` derives one from PyTorch's initial seed.
        balance: ``None``: one reservoir over the whole stream; ``"classes"``: the memory split
            evenly over the classes seen so far (``floor`` or ``ceil`` of ``memory_size / classes``
            each), each class's share a reservoir of that class's stream, re-balanced when a new
            class arrives (:class:`~neurenix.continual.memory.ClassBalancedMemory`; targets must
            be class labels). It guarantees rare classes the share a reservoir would mostly deny
            them (Chrysakis & Moens 2020, "Online Continual Learning from Imbalanced Data"); on
            class-incremental split digits and Fashion-MNIST it did not beat the reservoir's
            average accuracy (docs/task-free.md). An insert reads which classes the batch holds
            (one host-device synchronization on a GPU) unless the classes to come are known:
            under a Trainer a :class:`~neurenix.data.TaskDataset` (or ``ConcatTaskDataset``)
            announces its classes at the fit's start, standalone :meth:`announce_classes` does,
            and once every class holds its share inserts read nothing.
        selection: ``None``: samples enter the memory as they stream by (``add_to_memory``, or
            every training batch under a Trainer). ``"herding"``, ``"closest"`` or ``"random"``:
            an exemplar memory (:class:`~neurenix.continual.memory.ExemplarMemory`: the class
            split above, whatever ``balance`` says) filled at each task's end from the task's
            data, each class keeping the first of its samples ranked by the strategy
            (:func:`~neurenix.continual.exemplars.select_exemplars`; iCaRL's herding), old classes
            shrinking to their first-ranked as classes arrive. The data is the fit's training
            data under a Trainer, and standalone the ``dataloader`` given to ``register_task``;
            ``add_to_memory`` is refused. Targets must be class labels. Under DDP each process
            selects from its own share of the data into its own memory (docs/methods/exemplars.md).
        feature_extractor: with ``"herding"`` or ``"closest"``, the submodule of ``model`` (or its
            name) whose output is the features samples are ranked by (``model.backbone``).
        offer: under a Trainer, which training batches are offered to the memory:
            ``"every_epoch"`` (every batch of every epoch, so with ``E`` epochs per task each
            sample is offered ``E`` times and may sit in memory more than once), or ``"once"``
            (the batches of each task's first epoch: each training sample of a task is offered
            once; later epochs replay and offer nothing). The reservoir's guarantee then holds
            over the stream of distinct samples: each is in memory with probability
            ``min(1, memory_size / samples offered so far)``. A run resumed in a later epoch of a
            task offers nothing (the task's first epoch is in the state); under DDP each process
            offers its shard of the first epoch to its own memory, as with ``"every_epoch"``.
            Standalone the caller offers with ``add_to_memory`` and ``offer`` does not apply.
            Not with ``selection`` (exemplars are chosen at each task's end).

    Under a Trainer the LightningModule needs :class:`~neurenix.continual.ContinualLossMixin`:
    its ``training_step`` then receives the extended batch, and each batch's new samples are
    offered to the memory after the replayed ones are drawn.

    Example::

        replay = ExperienceReplay(model, memory_size=1000, replay_ratio=0.5)
        for inputs, targets in task2_loader:
            replay.train_step(optimizer, loss_fn, inputs, targets, task_id=2)
            replay.add_to_memory(inputs, targets, task_id=2)

        # Exemplars chosen by herding at each task's end, from the data register_task gives:
        replay = ExperienceReplay(model, 1000, 0.5, selection="herding", feature_extractor=model.backbone)
        for task_id, task_loader in enumerate(task_loaders):
            replay.register_task(task_id, task_loader)
            for inputs, targets in task_loader:
                replay.train_step(optimizer, loss_fn, inputs, targets, task_id=task_id)
        replay.finish_task()  # the last task's exemplars
    """

    needs_loss_mixin = True
    remembers_training_batches = False  # the caller offers batches with add_to_memory (see the example)

    def __init__(
        self,
        model: torch.nn.Module,
        memory_size: int = 1000,
        replay_ratio: float = 0.5,
        device: Optional[torch.device] = None,
        *,
        seed: Optional[int] = None,
        balance: Optional[str] = None,
        selection: Optional[str] = None,
        feature_extractor: Union[None, torch.nn.Module, str] = None,
        offer: str = "every_epoch",
    ) -> None:
        check_model(model)
        check_int("memory_size", memory_size, minimum=0)
        self.replay_ratio = check_real("replay_ratio", replay_ratio, minimum=0.0)
        self.balance = None if balance is None else check_choice("balance", balance, BALANCES)
        memory_class = ReservoirMemory if self.balance is None else ClassBalancedMemory
        super().__init__(
            model,
            memory_size,
            device,
            seed,
            memory_class,
            selection=selection,
            feature_extractor=feature_extractor,
            offer=offer,
        )

    def hyperparameters(self) -> dict[str, Any]:
        # ``balance``, ``selection`` and ``offer`` only when set: the default's state key (hence
        # its checkpoints) stays as it was.
        balance = {} if self.balance is None else {"balance": self.balance}
        selection = {} if self.selection is None else {"selection": self.selection}
        offer = {} if self.offer == "every_epoch" else {"offer": self.offer}
        return {"memory_size": self.memory_size, "replay_ratio": self.replay_ratio, **balance, **selection, **offer}

    # ---------------------------------------------------------------------------- shared core
    @override
    def extend_lightning_batch(self, batch: Any) -> Any:
        inputs, targets, task_ids = split_batch(batch)
        extended = self.extend_batch(inputs, targets, task_ids)
        if self._offering:  # offer="once": the task's first epoch only
            self._remember(inputs.detach(), targets.detach(), self._task_ids_of(inputs, task_ids))
        return join_batch(batch, *extended)
