"""Experience replay with a reservoir memory (Chaudhry et al. 2019, "On Tiny Episodic Memories"),
or a class-balanced one (each class an equal share, each share a reservoir of its class)."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from neurenix.continual._checks import (
    check_batch,
    check_choice,
    check_finite_samples,
    check_int,
    check_model,
    check_real,
    check_task_id,
)
from neurenix.continual.base import default_seed
from neurenix.continual.callback import ContinualCallback, join_batch, split_batch
from neurenix.continual.distributed import all_gather_objects, rank_and_world_size
from neurenix.continual.memory import ClassBalancedMemory, ReplayBatch, ReservoirMemory

__all__ = ["BALANCES", "ExperienceReplay", "ReplayBatch"]

#: Values of ``ExperienceReplay(balance=...)`` besides ``None`` (one reservoir over the whole stream).
BALANCES = ("classes",)


class ExperienceReplay(ContinualCallback):
    """Train on new samples together with samples remembered from the whole stream so far.

    The memory keeps ``memory_size`` samples by reservoir sampling, so every sample offered
    (``add_to_memory``, or every training batch under a Trainer) is in memory with the same
    probability. Each training step appends ``round(replay_ratio · batch_size)`` distinct samples
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
            average accuracy (docs/task-free.md).

    Under a Trainer the LightningModule needs :class:`~neurenix.continual.ContinualLossMixin`:
    its ``training_step`` then receives the extended batch, and each batch's new samples are
    offered to the memory after the replayed ones are drawn.

    Example::

        replay = ExperienceReplay(model, memory_size=1000, replay_ratio=0.5)
        for inputs, targets in task2_loader:
            replay.train_step(optimizer, loss_fn, inputs, targets, task_id=2)
            replay.add_to_memory(inputs, targets, task_id=2)
    """

    needs_loss_mixin = True

    def __init__(
        self,
        model: torch.nn.Module,
        memory_size: int = 1000,
        replay_ratio: float = 0.5,
        device: Optional[torch.device] = None,
        *,
        seed: Optional[int] = None,
        balance: Optional[str] = None,
    ) -> None:
        check_model(model)
        self.memory_size = check_int("memory_size", memory_size, minimum=0)
        self.replay_ratio = check_real("replay_ratio", replay_ratio, minimum=0.0)
        seed = default_seed("ExperienceReplay") if seed is None else check_int("seed", seed, minimum=0)
        self.balance = None if balance is None else check_choice("balance", balance, BALANCES)
        super().__init__(model, device)
        memory_class = ReservoirMemory if self.balance is None else ClassBalancedMemory
        self.memory = memory_class(self.memory_size, self.device, seed)

    def hyperparameters(self) -> dict[str, Any]:
        # ``balance`` only when set: the default's state key (hence its checkpoints) stays as it was.
        balance = {} if self.balance is None else {"balance": self.balance}
        return {"memory_size": self.memory_size, "replay_ratio": self.replay_ratio, **balance}

    # ---------------------------------------------------------------------------- the continual-learning API
    def add_to_memory(self, inputs: Tensor, targets: Tensor, task_id: int) -> None:
        """Offer a batch of samples of task ``task_id`` to the memory.

        Raises:
            TypeError / ValueError: not tensors, different sample counts, a non-int task id, or
                shapes/dtypes that differ from the samples the memory already holds.
            ValueError: ``inputs`` (or floating-point ``targets``) hold NaN or infinite values,
                which the memory would keep and replay until they are replaced. (Training
                batches that a Trainer offers to the memory are not scanned, as no training
                step is: docs/reliability.md.)
        """
        check_batch(inputs, targets)
        task_id = check_task_id(task_id)
        check_finite_samples("inputs", inputs)
        check_finite_samples("targets", targets)
        self.memory.check_batch(inputs, targets)
        self.prepare_for_device()
        task_ids = torch.full((inputs.shape[0],), task_id, dtype=torch.long, device=self.memory.device)
        self.memory.add(inputs.detach(), targets.detach(), task_ids)

    def get_replay_batch(self, batch_size: int) -> ReplayBatch:
        """``min(batch_size, len(memory))`` distinct remembered samples: ``(inputs, targets, task_ids)``.

        Raises:
            ValueError: ``batch_size < 1`` or the memory is empty.
        """
        batch_size = check_int("batch_size", batch_size, minimum=1)
        self.prepare_for_device()
        return self.memory.sample(batch_size)

    def replay_count(self, batch_size: int) -> int:
        """How many samples a step on ``batch_size`` new ones replays: ``round(replay_ratio · batch_size)``."""
        return round(self.replay_ratio * batch_size)

    # ---------------------------------------------------------------------------- shared core
    @override
    def extend_batch(
        self, inputs: Tensor, targets: Tensor, task_ids: Optional[Tensor]
    ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        count = self.replay_count(inputs.shape[0])
        if count == 0 or len(self.memory) == 0:
            return inputs, targets, task_ids
        replayed = self.memory.sample(count)
        inputs = torch.cat([inputs, replayed.inputs.to(inputs.device)])
        targets = torch.cat([targets, replayed.targets.to(targets.device)])
        if task_ids is not None:
            task_ids = torch.cat([task_ids, replayed.task_ids.to(task_ids.device, task_ids.dtype)])
        return inputs, targets, task_ids

    @override
    def extend_lightning_batch(self, batch: Any) -> Any:
        inputs, targets, task_ids = split_batch(batch)
        extended = self.extend_batch(inputs, targets, task_ids)
        new_task_ids = task_ids
        if new_task_ids is None:
            new_task_ids = torch.full((inputs.shape[0],), self._task_in_training(), dtype=torch.long, device=inputs.device)
        self.memory.add(inputs.detach(), targets.detach(), new_task_ids)
        return join_batch(batch, *extended)

    def _task_in_training(self) -> int:
        if self.active_task is None:
            raise RuntimeError("ExperienceReplay got a training batch outside a task (on_train_start did not run)")
        return self.active_task

    @override
    def prepare_for_device(self) -> None:
        self.memory.to(self.device)

    # ---------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "memory": self.memory.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
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
        # Under DDP every rank keeps its own reservoir of its own shard of the stream, and only
        # rank 0 writes the checkpoint: gather all of them into it, so that nothing is lost.
        if rank_and_world_size()[1] == 1:
            return
        states = all_gather_objects(_on_cpu(self.memory.state_dict()))
        checkpoint["callbacks"][self.state_key]["memory_per_rank"] = states


def _on_cpu(state: dict[str, Any]) -> dict[str, Any]:
    return {key: value.cpu() if isinstance(value, Tensor) else value for key, value in state.items()}


def redistributed_memory(per_rank: list[dict[str, Any]], rank: int, world_size: int, capacity: int) -> dict[str, Any]:
    """Rank ``rank``'s memory when a run saved by ``len(per_rank)`` processes resumes on ``world_size``.

    The saved samples are pooled and dealt out in turn (``rank::world_size``), so nothing is
    dropped unless a rank's share exceeds its capacity (then a seeded uniform subset is kept);
    each rank counts an equal share of the stream seen so far. The sampling generators cannot
    be carried over between different numbers of processes: they restart from the saved seed.
    """
    stored = [state for state in per_rank if state.get("inputs") is not None]
    if not stored:
        return {"num_seen": 0, "seed": per_rank[0].get("seed", 0)}
    pooled = {key: torch.cat([state[key] for state in stored])[rank::world_size] for key in ("inputs", "targets", "task_ids")}
    seed = int(per_rank[0]["seed"]) + rank
    if pooled["inputs"].shape[0] > capacity:
        keep = torch.randperm(pooled["inputs"].shape[0], generator=torch.Generator().manual_seed(seed))[:capacity]
        pooled = {key: value[keep] for key, value in pooled.items()}
    num_seen = sum(int(state["num_seen"]) for state in per_rank) // world_size
    return {**pooled, "num_seen": max(num_seen, pooled["inputs"].shape[0]), "seed": seed}
