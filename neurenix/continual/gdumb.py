"""GDumb (Prabhu, Torr & Dokania, ECCV 2020, "GDumb: A Simple Approach that Questions Our
Progress in Continual Learning"): a class-balanced memory, and at each task's end the model
trained from its initial weights on the memory alone."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from typing_extensions import override

from neurenix.continual._checks import check_int, check_model
from neurenix.continual.base import global_generator_kept, model_arguments, uncompiled
from neurenix.continual.callback import continual_methods, split_batch
from neurenix.continual.distributed import rank_and_world_size
from neurenix.continual.memory import ClassBalancedMemory
from neurenix.continual.rehearsal import RehearsalMethod

__all__ = ["GDumb", "MemoryDataset"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]

#: ``filled_task`` of a GDumb whose memory no task's fit has filled yet.
NO_TASK = -1


class GDumb(RehearsalMethod):
    """A class-balanced memory of the stream; the model is trained from its initial weights on
    the memory alone, and that model is the one evaluated.

    The memory (:class:`~neurenix.continual.memory.ClassBalancedMemory`) splits ``memory_size``
    evenly over the classes seen so far (``floor`` or ``ceil`` of ``memory_size / classes``
    each); a new class shrinks the others' shares. The paper's sampler is greedy within a class
    (a class below its share takes each new sample, one at its share refuses it); ours keeps a
    uniform reservoir of each class's stream, so which samples of a class are kept does not
    depend on where they came in the stream. Both hold the same number of samples per class.

    At a task's end the model is reset to the weights it had when GDumb was built (parameters and
    buffers, bit for bit) and trained on the memory only, with a fresh optimizer, for a given
    number of epochs; the samples of the stream are never trained on directly.

    - Standalone: offer every sample with :meth:`add_to_memory`, then call
      :meth:`train_on_memory` (``epochs`` epochs of shuffled mini-batches of the memory).
    - Lightning (with a :class:`~neurenix.data.TaskSequenceDataModule`, e.g. through
      ``fit_sequence``): each task's fit is the memory training. At the fit's start GDumb fills
      its memory from the task's whole training set (in order) and resets the model; the
      datamodule then serves the memory as the task's training data, so the fit's epochs
      (``epochs_per_task``) are the epochs on the memory, run by the Trainer's own strategy,
      precision, optimizer (``configure_optimizers``, new for each fit) and checkpoints, and
      ``ForgettingCurves`` measures the retrained model at the fit's end.

    Under DDP the memory is one memory of the whole stream, the same on every process: rank 0
    fills it and broadcasts it (``memory_size`` samples once per task), and the fit shards it
    like any dataset (Lightning's ``DistributedSampler``). The initial weights are rank 0's.

    Args:
        model: the network (its weights now are the ones every retraining starts from).
        memory_size: samples kept in all, ``>= 1``.
        device: where the memory lives; ``None`` follows the model.
        seed: seeds the memory's sampling (and the standalone batch order); ``None`` derives one
            from PyTorch's initial seed.

    Raises:
        TypeError / ValueError: an argument of the wrong type or out of range.

    Example::

        gdumb = GDumb(model, memory_size=2000)
        for task_id, loader in enumerate(task_loaders):
            for inputs, targets in loader:
                gdumb.add_to_memory(inputs, targets, task_id)
            gdumb.train_on_memory(lambda p: torch.optim.SGD(p, lr=0.05), loss_fn, epochs=30, batch_size=16)
    """

    needs_class_labels = True
    #: The stream is not trained on: ``add_to_memory`` is the only way in (``train_step`` refuses).
    remembers_training_batches = False

    def __init__(
        self,
        model: nn.Module,
        memory_size: int = 2000,
        device: Optional[torch.device] = None,
        *,
        seed: Optional[int] = None,
    ) -> None:
        check_model(model)
        check_int("memory_size", memory_size, minimum=1)
        super().__init__(model, memory_size, device, seed, ClassBalancedMemory)
        #: Parameters and buffers when GDumb was built, on the CPU: every retraining starts here.
        # Named as the module's own (not a compiled wrapper's '_orig_mod.*'), from the module the
        # method keeps (a compiled LightningModule given: the module Lightning fits).
        self._initial_state = _cpu_copy(uncompiled(self.model).state_dict())
        self._initial_from_rank_zero = False
        #: The task whose training data last filled the memory under a Trainer (``NO_TASK``: none).
        self.filled_task = NO_TASK
        #: How many times the model has been trained on the memory.
        self.memory_trainings = 0

    def hyperparameters(self) -> dict[str, Any]:
        return {"memory_size": self.memory_size}

    # ---------------------------------------------------------------------------- standalone
    def train_step(self, optimizer: Any, loss_fn: Any, inputs: Tensor, targets: Tensor, task_id: int) -> Tensor:
        """Refused: GDumb never trains on the stream.

        Raises:
            TypeError: always; use :meth:`add_to_memory` and :meth:`train_on_memory`.
        """
        raise TypeError(
            "GDumb does not train on the stream, so it has no train_step: offer each batch with "
            "add_to_memory(inputs, targets, task_id), and at each task's end call "
            "train_on_memory(optimizer_factory, loss_fn, epochs, batch_size), which trains the model "
            "from its initial weights on the memory alone"
        )

    def reset_model(self) -> None:
        """Put the model's parameters and buffers back to their values when GDumb was built
        (in place: optimizers holding the parameters keep them)."""
        with torch.no_grad():
            for name, tensor in uncompiled(self.model).state_dict().items():
                tensor.copy_(self._initial_state[name])

    def train_on_memory(
        self,
        optimizer_factory: OptimizerFactory,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        epochs: int,
        batch_size: int,
        *,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """Reset the model to its initial weights and train it on the memory alone.

        Each epoch visits every stored sample once, in the order of ``torch.randperm(len(memory),
        generator=generator)`` (what a shuffled ``TaskSequenceDataModule`` draws for each epoch
        on GDumb's memory from its seed's generator), in mini-batches of ``batch_size`` (the last one smaller): ``epochs
        · ceil(len(memory) / batch_size)`` steps of ``optimizer_factory(model.parameters())``, a
        new optimizer. The model is in train mode meanwhile, then back in the mode it was in.

        Args:
            optimizer_factory: ``optimizer_factory(parameters)`` returns a ``torch.optim.Optimizer``
                (e.g. ``lambda p: torch.optim.SGD(p, lr=0.05)``).
            loss_fn: ``loss_fn(outputs, targets)`` returning a scalar.
            epochs: passes over the memory, ``>= 1``.
            batch_size: samples per step, ``>= 1``.
            generator: the batch order's generator (a CPU one reproduces a
                ``TaskSequenceDataModule``'s shuffling); ``None``: the memory's own, seeded by
                ``seed`` and saved in :meth:`state_dict`.

        Returns:
            The mean loss of each epoch, ``(epochs,)``.

        Raises:
            TypeError / ValueError: a bad argument, an empty memory, or a factory that does not
                return an optimizer of the model's parameters (the model is unchanged then).
        """
        epochs = check_int("epochs", epochs, minimum=1)
        batch_size = check_int("batch_size", batch_size, minimum=1)
        if not callable(optimizer_factory) or isinstance(optimizer_factory, torch.optim.Optimizer):
            raise TypeError(
                "optimizer_factory must be a function parameters -> optimizer (e.g. lambda p: "
                f"torch.optim.SGD(p, lr=0.05)): GDumb trains from scratch with a new optimizer each time, got "
                f"{type(optimizer_factory).__name__}"
            )
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if len(self.memory) == 0:
            raise ValueError("train_on_memory: the memory is empty; offer samples with add_to_memory first")
        self.prepare_for_device()
        optimizer = optimizer_factory(self.model.parameters())
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer_factory must return a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.reset_model()
        # Summed on the memory's device and read once at the end: no step waits for the host.
        losses = torch.zeros(epochs, dtype=torch.float64, device=self.memory.device)
        with _training_mode(self.model):
            for epoch in range(epochs):
                losses[epoch] = self._epoch_on_memory(optimizer, loss_fn, batch_size, generator)
        self.memory_trainings += 1
        return losses.cpu()

    def _epoch_on_memory(
        self, optimizer: torch.optim.Optimizer, loss_fn: Callable[[Tensor, Tensor], Tensor], batch_size: int, generator: Optional[torch.Generator]
    ) -> Tensor:
        """One pass over the memory; the mean of the batches' losses, weighted by batch size (a
        float64 scalar on the memory's device: the steps read nothing)."""
        size = len(self.memory)
        if generator is None:
            order = self.memory.draw(size)
        else:
            order = torch.randperm(size, generator=generator).to(self.memory.device)
        total = torch.zeros((), dtype=torch.float64, device=self.memory.device)
        for slots in order.split(batch_size):
            inputs, targets, task_ids = self.memory.take(slots)
            optimizer.zero_grad()
            loss = loss_fn(self.model(*model_arguments(self.model, inputs, task_ids)), targets)
            loss.backward()
            optimizer.step()
            total += loss.detach().to(total.device, torch.float64) * slots.shape[0]
        return total / size

    # ---------------------------------------------------------------------------- Lightning side
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        from neurenix.data import TaskSequenceDataModule  # neurenix.data imports neurenix.continual

        if not isinstance(getattr(trainer, "datamodule", None), TaskSequenceDataModule):
            raise ValueError(
                "GDumb under a Trainer needs a neurenix.data.TaskSequenceDataModule (fit_sequence(trainer, "
                "model, datamodule, epochs_per_task=...)): it serves GDumb's memory as each task's training "
                f"data; got datamodule={type(getattr(trainer, 'datamodule', None)).__name__}"
            )
        others = [type(m).__name__ for m in continual_methods(trainer) if m is not self]
        if others:
            raise ValueError(
                f"GDumb and {', '.join(others)} are on one Trainer: GDumb resets the model to its initial "
                "weights at every task, which discards what any other method protects; use GDumb alone"
            )

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_fit_start(trainer, pl_module)
        task = self._task_of_this_fit(trainer)
        # A fit resumed inside (or at the end of) a task finds the memory filled and the model
        # restored from the checkpoint: neither is redone.
        if task != self.filled_task:
            self._start_memory_training(trainer, task)

    def _start_memory_training(self, trainer: "pl.Trainer", task: int) -> None:
        """Fill the memory from task ``task``'s training data, then reset the model."""
        self.enter_task(task)
        rank, world_size = rank_and_world_size()
        if rank == 0:
            self._fill_from(trainer.datamodule.task_train_dataloader(task), task)
        if world_size > 1:
            self._memory_from_rank_zero(trainer)
            if not self._initial_from_rank_zero:  # unseeded ranks may have built different models
                self._initial_state = trainer.strategy.broadcast(self._initial_state, src=0)
                self._initial_from_rank_zero = True
        self.reset_model()
        self.filled_task = task
        self.memory_trainings += 1

    def _fill_from(self, loader: Any, task: int) -> None:
        with global_generator_kept():  # a loader that draws seeds leaves the user's generator alone
            for batch in loader:
                inputs, targets, _ = split_batch(batch)
                self.check_targets(targets)
                self.memory.check_batch(inputs, targets)
                self._remember(inputs, targets, task)

    def _memory_from_rank_zero(self, trainer: "pl.Trainer") -> None:
        state = self.memory.state_dict() if trainer.global_rank == 0 else None
        state = trainer.strategy.broadcast(None if state is None else _cpu_copy(state), src=0)
        if trainer.global_rank != 0:
            self.memory.load_state_dict(state)

    @override
    def training_dataset(self, task: int, dataset: Any) -> Any:
        if task != self.filled_task or len(self.memory) == 0:
            return None
        return MemoryDataset(self.memory.state_dict(), with_task_ids=_has_task_ids(dataset))

    @override
    def on_save_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]) -> None:
        # Every process holds the same memory (rank 0's): rank 0's state is all of it, and a run
        # resumed on another number of processes must get it whole, not dealt out as replay's.
        return

    # ---------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "initial_state": _cpu_copy(self._initial_state),
            "filled_task": self.filled_task,
            "memory_trainings": self.memory_trainings,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict({key: value for key, value in state_dict.items() if key != "memory_per_rank"})
        initial = state_dict.get("initial_state")
        if initial is not None:
            self._initial_state = _cpu_copy(initial)
            self._initial_from_rank_zero = True  # what rank 0 saved
        self.filled_task = int(state_dict.get("filled_task", NO_TASK))
        self.memory_trainings = int(state_dict.get("memory_trainings", 0))


class MemoryDataset(Dataset):
    """A snapshot of a memory's samples as a map-style dataset (on the CPU, in slot order).

    Items are ``(inputs, targets)``, or ``(inputs, targets, task_ids)`` with ``with_task_ids``
    (each sample's own task id, for multi-head models).
    """

    def __init__(self, memory_state: dict[str, Any], *, with_task_ids: bool = False) -> None:
        self.inputs = memory_state["inputs"].cpu()
        self.targets = memory_state["targets"].cpu()
        self.task_ids = memory_state["task_ids"].cpu()
        self.with_task_ids = with_task_ids

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, ...]:
        item = (self.inputs[index], self.targets[index])
        return (*item, self.task_ids[index]) if self.with_task_ids else item

    def __getitems__(self, indices: list[int]) -> list[tuple[Tensor, ...]]:
        """The items of ``indices`` (one indexing per field; a loader collates them as usual).

        With it a :class:`~neurenix.data.TaskDataLoader` serves batches without the per-epoch seed
        a ``DataLoader`` iterator draws from its generator: the order is one ``randperm`` per epoch,
        ``train_on_memory``'s."""
        index = torch.as_tensor(indices, dtype=torch.long)
        fields = (self.inputs, self.targets, self.task_ids) if self.with_task_ids else (self.inputs, self.targets)
        return list(zip(*(field[index] for field in fields)))


def _has_task_ids(dataset: Any) -> bool:
    """Whether ``dataset``'s items carry task ids (a third tensor), as the memory's items then must."""
    flag = getattr(dataset, "with_task_ids", None)
    if isinstance(flag, bool):
        return flag
    item = dataset[0]
    return isinstance(item, (tuple, list)) and len(item) == 3


def _cpu_copy(state: dict[str, Any]) -> dict[str, Any]:
    return {key: value.detach().cpu().clone() if isinstance(value, Tensor) else value for key, value in state.items()}


@contextlib.contextmanager
def _training_mode(model: nn.Module) -> Iterator[None]:
    """Every submodule in train mode, then back in its own previous mode."""
    modes = [(module, module.training) for module in model.modules()]
    model.train()
    try:
        yield
    finally:
        for module, was_training in modes:
            module.training = was_training
