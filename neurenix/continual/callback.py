"""Lightning's door into the methods: the same object as the standalone API, driven by hooks.

Every method class derives from :class:`ContinualCallback`, so ``EWC(model)`` is at once the
object of the Neurenix continual-learning API (``register_task``, ``train_step``, ...) and a
Lightning ``Callback``.
Each ``Trainer.fit`` is one task:

- ``on_train_start``: the task starts (its id: the datamodule's ``current_task`` if it has one,
  else the task being resumed, else the next number from 0);
- ``on_before_optimizer_step``: gradients are final there (accumulated, all-reduced under DDP,
  unscaled under 16-bit AMP) and not yet clipped; SI reads the gradient of the unregularized
  loss, then every quadratic penalty adds its closed-form gradient, then A-GEM or GEM projects
  the result. No second ``backward`` of the training loss and no
  change to the loss that the LightningModule owns;
- ``on_train_end``: the task is consolidated at the parameters it ended with.

Replay and distillation change the batch and the loss, which only the LightningModule can do:
they need :class:`neurenix.continual.ContinualLossMixin` on the module.

A method may be given a compiled LightningModule (``torch.compile(module)``): it keeps the
LightningModule itself, which is what ``Trainer.fit`` trains (Lightning unwraps the compiled
module and compiles its ``forward`` and ``training_step`` in place), so the hooks' ``pl_module``,
the method's model and the module whose forwards it captures are one object.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from neurenix.continual.base import ContinualMethod, inputs_as_given, uncompiled
from neurenix.continual.distributed import StaysInItsProcess, spawn_refusal

__all__ = ["ContinualCallback", "continual_methods", "fitted_module", "split_batch", "join_batch"]


def fitted_module(model: Any) -> Any:
    """The module a ``Trainer`` fits for ``model``: a compiled LightningModule's own module, else ``model``.

    ``Trainer.fit(torch.compile(module))`` trains ``module`` (its ``forward`` and ``training_step``
    compiled in place); the wrapper ``torch.compile`` returned is never called. A compiled plain
    ``nn.Module`` inside a LightningModule is called as it is, and stays.
    """
    module = uncompiled(model)
    return module if module is not model and isinstance(module, pl.LightningModule) else model


def continual_methods(trainer: Optional["pl.Trainer"]) -> list["ContinualCallback"]:
    """The neurenix methods among a trainer's callbacks, in callback order."""
    if trainer is None:
        return []
    return [callback for callback in trainer.callbacks if isinstance(callback, ContinualCallback)]


def split_batch(batch: Any) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(inputs, targets[, task_ids])`` from a training batch (a tuple or list of tensors)."""
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3) and all(isinstance(b, Tensor) for b in batch):
        task_ids = batch[2] if len(batch) == 3 else None
        return batch[0], batch[1], task_ids
    raise TypeError(
        "neurenix reads training batches as (inputs, targets) or (inputs, targets, task_ids) "
        f"tuples or lists of tensors, got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
    )


def join_batch(like: Sequence[Any], inputs: Tensor, targets: Tensor, task_ids: Optional[Tensor]) -> Any:
    """A batch of the same kind (tuple or list, 2 or 3 items) as ``like``."""
    items = [inputs, targets] if len(like) == 2 else [inputs, targets, task_ids]
    return type(like)(items)


def _orphaned_state_keys(cls: type, trainer: "pl.Trainer", states: dict[Any, Any]) -> list[str]:
    """The checkpoint's state keys of callbacks of class ``cls`` that no callback of ``trainer`` claims.

    A key is ``f"{qualname}{hyperparameters!r}"`` (``Callback._generate_state_key``); keys that
    another callback of the trainer owns (two instances of one class) are not orphans.
    """
    prefix = f"{cls.__qualname__}{{"
    claimed = {callback.state_key for callback in trainer.callbacks}
    return [key for key in states if isinstance(key, str) and key.startswith(prefix) and key not in claimed]


class ContinualCallback(StaysInItsProcess, ContinualMethod, Callback):
    """A continual-learning method driven by a Lightning ``Trainer`` (one fit per task)."""

    #: Whether the method changes batches or losses and so needs ContinualLossMixin.
    needs_loss_mixin = False

    def __init__(self, model: Any, device: Any = None) -> None:
        super().__init__(fitted_module(model), device)
        self._last_gradient_round: Optional[tuple[int, int]] = None
        self._training_ran = False
        self._first_batch_checked = False

    def __repr__(self) -> str:
        settings = ", ".join(f"{name}={value!r}" for name, value in self.hyperparameters().items())
        return f"{type(self).__name__}({type(self.model).__name__}{', ' if settings else ''}{settings})"

    # ---------------------------------------------------------------------------- identity
    def hyperparameters(self) -> dict[str, Any]:
        """The method's hyper-parameters (logged with a run; they also name its checkpoint state)."""
        return {}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(**self.hyperparameters())

    @override
    def on_load_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]) -> None:
        # Lightning only warns when a checkpoint holds no state under this state_key, and the
        # method would resume empty (no Fisher, anchor, teacher or memory, no finished tasks).
        # It calls every callback's on_load_checkpoint before any callback's load_state_dict,
        # so raising here leaves every method's state as it was.
        saved = _orphaned_state_keys(type(self), trainer, checkpoint.get("callbacks") or {})
        if saved and self.state_key not in checkpoint["callbacks"]:
            raise ValueError(
                f"the checkpoint holds state for {' and '.join(saved)}, not for {self.state_key}: build "
                "the method with the hyper-parameters it was saved with, or it would resume without its state"
            )

    # ---------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        if not any(module is self.model for module in pl_module.modules()):
            raise ValueError(
                f"{type(self).__name__} was built for a model that is not part of the "
                f"LightningModule being fit ({type(pl_module).__name__}): pass the LightningModule "
                "itself, or a submodule of it, as `model`"
            )
        strategy = trainer.strategy
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) or isinstance(strategy, DeepSpeedStrategy):
            raise ValueError(
                f"{type(self).__name__} supports single-device and DDP strategies, got "
                f"{type(strategy).__name__}: strategies that shard parameters are not supported"
            )
        start_method = getattr(strategy, "_start_method", "popen")
        if start_method != "popen":
            # Reached under fork-based strategies (ddp_fork, ddp_notebook), in the children:
            # spawn-based ones are refused in the parent, when the Trainer is pickled.
            raise ValueError(spawn_refusal(type(self).__name__, start_method))
        if self.needs_loss_mixin:
            from neurenix.continual.mixin import ContinualLossMixin

            if not isinstance(pl_module, ContinualLossMixin):
                raise TypeError(
                    f"{type(self).__name__} changes the training batch or loss, so the LightningModule "
                    f"must inherit neurenix.continual.ContinualLossMixin: "
                    f"`class {type(pl_module).__name__}(ContinualLossMixin, LightningModule)`"
                )

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._check_model_device()
        self.prepare_for_device()
        self._training_ran = False

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._training_ran = True
        self._first_batch_checked = False
        self.enter_task(self._task_of_this_fit(trainer))

    @override
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> None:
        # What the task's end will need from its batches is checked on the first one, not after
        # the whole task has trained.
        if not self._first_batch_checked:
            self.check_task_batch(batch)
            self._first_batch_checked = True

    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._training_ran:
            return
        if self.active_task is not None:
            # Resumed from a checkpoint written at a task's last epoch end, Lightning finds the
            # fit already complete and skips the training loop with its start/end hooks: the
            # task must still be consolidated here, while its data is at hand.
            self._finish_task_of_fit(trainer)
        elif self._task_of_this_fit(trainer) not in self.finished_tasks:
            raise RuntimeError(self._no_training_message(trainer))

    def _no_training_message(self, trainer: "pl.Trainer") -> str:
        """Why a fit of a new task trained nothing, and how to train a sequence instead."""
        if trainer.limit_train_batches == 0:
            reason = "the Trainer was built with limit_train_batches=0"
        elif trainer.num_training_batches == 0:
            reason = "the fit's training loader yields no batches"
        else:
            reason = (
                f"the Trainer had already reached its limits (epoch {trainer.current_epoch} of "
                f"max_epochs={trainer.max_epochs}, step {trainer.global_step} of max_steps={trainer.max_steps}), "
                "as a Trainer does after its first fit"
            )
        return (
            f"{type(self).__name__}: this fit trained no step for task {self._task_of_this_fit(trainer)} "
            f"(tasks trained so far: {self.finished_tasks}): {reason}. Train each task with a new Trainer "
            "(`L.Trainer(max_epochs=..., callbacks=[*methods])`), or a whole TaskSequenceDataModule with "
            "neurenix.data.fit_sequence(trainer, model, datamodule, epochs_per_task=...), which extends the "
            "limits task by task"
        )

    @override
    def on_before_optimizer_step(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: Any
    ) -> None:
        # The first neurenix method to get this hook handles the step for all of them, so that
        # SI reads the gradient before *any* penalty is added, whatever the callback order.
        gradient_round = (trainer.global_step, id(optimizer))
        if self._last_gradient_round == gradient_round:
            return
        methods = continual_methods(trainer)
        for method in methods:
            method._last_gradient_round = gradient_round
            method.observe_gradients()
        for method in methods:
            method.add_penalty_gradients()
        for method in methods:
            method.project_gradients()
            method.steps_in_active_task += 1

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.active_task is not None and self.steps_in_active_task == 0:
            rank_zero_warn(
                f"{type(self).__name__}: task {self.active_task} ended without a single optimizer step"
            )
        self._finish_task_of_fit(trainer)

    def _finish_task_of_fit(self, trainer: "pl.Trainer") -> None:
        """Consolidate the task with the fit's training data, whose inputs the method converts as
        the fit's precision converts its batches (``bf16-true``, ``64-true``: to the model's dtype)."""
        self._convert_inputs = trainer.precision_plugin.convert_input
        try:
            self.finish_task(data=trainer.train_dataloader)
        finally:
            self._convert_inputs = inputs_as_given

    def _task_of_this_fit(self, trainer: "pl.Trainer") -> int:
        datamodule = getattr(trainer, "datamodule", None)
        current = getattr(datamodule, "current_task", None)
        if isinstance(current, int) and not isinstance(current, bool):
            return current
        if self.active_task is not None:  # resumed in the middle of a task
            return self.active_task
        return max(self.finished_tasks) + 1 if self.finished_tasks else 0

    def check_task_batch(self, batch: Any) -> None:
        """Refuse, at a task's first training batch, a batch that its consolidation could not read.

        Raises:
            TypeError / ValueError: the method names what it needs.
        """

    def training_dataset(self, task: int, dataset: Any) -> Any:
        """What the fit of task ``task`` trains on in place of ``dataset``, the task's own training
        data; ``None`` (the default): the task's own.

        :class:`~neurenix.data.TaskSequenceDataModule` asks every method on its trainer when it
        builds a training loader. GDumb serves its memory this way, so that its training on the
        memory is the task's fit itself (the Trainer's strategy, precision and checkpoints).
        """
        return None

    # ---------------------------------------------------------------------------- mixin side
    def extend_lightning_batch(self, batch: Any) -> Any:
        """The training batch to use (replay appends remembered samples)."""
        return batch

    def before_training_forward(self) -> None:
        """Called right before the LightningModule's ``training_step`` runs."""

    def transform_lightning_loss(self, loss: Tensor, batch: Any) -> Tensor:
        """The loss to back-propagate (distillation mixes in the teacher's term)."""
        return loss
