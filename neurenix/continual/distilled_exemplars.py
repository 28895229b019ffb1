"""What the class-incremental methods that distil from their previous selves and replay exemplars share.

iCaRL (:class:`~neurenix.continual.ICaRL`) and BiC (:class:`~neurenix.continual.BiC`) train on
the new batch plus exemplars chosen at each task's end, with a loss of their own that replaces
the user's and reads a teacher: the network frozen when the last task ended. They differ in that
loss and in how they predict (NCM, bias correction); the rest is here, once.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional, Union

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from typing_extensions import override

from neurenix.continual import functional as CF
from neurenix.continual._checks import check_choice, check_int, check_model, check_real
from neurenix.continual.base import widened_mask
from neurenix.continual.callback import continual_methods, join_batch, split_batch
from neurenix.continual.capture import CapturesTrainingForwards, ForwardCapture, hidden_forwards
from neurenix.continual.distillation import KnowledgeDistillation, frozen_copy, loaded_teacher, teacher_state
from neurenix.continual.exemplars import STRATEGIES
from neurenix.continual.rehearsal import AppendsReplayedSamples, RehearsalMethod

__all__ = ["DistilledExemplars"]


class DistilledExemplars(CapturesTrainingForwards, AppendsReplayedSamples, RehearsalMethod):
    """Exemplars chosen at each task's end, replayed in every step, and a loss distilled from a teacher.

    Subclasses give :meth:`_method_loss` (the loss that replaces the user's, from the step's
    outputs and :meth:`_read_step`'s teacher logits), :meth:`_default_features`, and may act at
    the task's end before the network becomes the teacher (:meth:`_before_snapshot`). Error
    messages name :attr:`method_name`, the class the user constructed.

    The state saved: the memory's (RehearsalMethod's), ``"teacher"`` (its weights, or ``None``
    before the first task's end), ``"seen_classes"`` and ``"old_classes"`` (boolean masks over
    output units); subclasses add theirs after these.
    """

    needs_loss_mixin = True
    needs_class_labels = True
    #: The name error messages give (the public class's, not a subclass's).
    method_name: ClassVar[str]
    #: How the paper names the method, and what its own distillation is (KnowledgeDistillation's refusal).
    paper_name: ClassVar[str]
    own_distillation: ClassVar[str]

    def __init__(
        self,
        model: nn.Module,
        memory_size: int,
        feature_extractor: Union[None, str, nn.Module],
        replay_ratio: float,
        device: Optional[torch.device],
        seed: Optional[int],
        selection: str,
    ) -> None:
        check_model(model)
        check_int("memory_size", memory_size, minimum=0)
        self.replay_ratio = check_real("replay_ratio", replay_ratio, minimum=0.0)
        check_choice("selection", selection, STRATEGIES)
        if feature_extractor is None:
            feature_extractor = self._default_features(model, selection)
        super().__init__(model, memory_size, device, seed, selection=selection, feature_extractor=feature_extractor)
        self.teacher: Optional[nn.Module] = None
        #: Output units of the classes met in training targets so far, and of those the teacher learned.
        self._seen_classes: Optional[Tensor] = None
        self._old_classes: Optional[Tensor] = None
        self._capture = ForwardCapture(model)

    def _default_features(self, model: nn.Module, selection: str) -> Optional[nn.Module]:
        """The features for ``feature_extractor=None`` (``model`` is checked already)."""
        raise NotImplementedError

    def hyperparameters(self) -> dict[str, Any]:
        return {"memory_size": self.memory_size, "replay_ratio": self.replay_ratio, "selection": self.selection}

    # ---------------------------------------------------------------------------- replay
    @override
    def extend_lightning_batch(self, batch: Any) -> Any:
        # Nothing is remembered from the batch: exemplars are chosen from the task's data at its end.
        inputs, targets, task_ids = split_batch(batch)
        return join_batch(batch, *self.extend_batch(inputs, targets, task_ids))

    # ---------------------------------------------------------------------------- shared core
    def _method_loss(self, inputs: Union[Tensor, tuple[Tensor, ...]], outputs: Tensor, targets: Tensor) -> Tensor:
        """The method's loss on a batch, which replaces the user's."""
        raise NotImplementedError

    @override
    def transform_loss(self, loss: Tensor, inputs: tuple[Tensor, ...], outputs: Any, targets: Tensor) -> Tensor:
        return self._method_loss(inputs, outputs, targets)

    def _read_step(
        self, inputs: Union[Tensor, tuple[Tensor, ...]], outputs: Tensor, targets: Tensor
    ) -> Optional[tuple[Tensor, Tensor]]:
        """Check a step's outputs, mark its targets' classes seen, and return the teacher's logits
        on the same inputs with the mask of its classes over the outputs' units (``None`` before
        the first task's end).

        Raises:
            ValueError: ``outputs`` not one row of logits per target.
        """
        arguments = CF.as_arguments(inputs)
        if not isinstance(outputs, Tensor) or outputs.dim() != 2 or outputs.shape[0] != targets.shape[0]:
            described = f"outputs of shape {tuple(outputs.shape)}" if isinstance(outputs, Tensor) else f"a {type(outputs).__name__}"
            raise ValueError(
                f"{self.method_name} reads the model's outputs as one logit per class, (samples, classes) for "
                f"{targets.shape[0]} targets: the model ({type(self.model).__name__}) returned {described}"
            )
        width = outputs.shape[1]
        self._seen_classes = widened_mask(self._seen_classes, width, outputs.device)
        self._seen_classes.index_fill_(0, targets.to(self._seen_classes.device), True)
        if self.teacher is None or self._old_classes is None:
            return None
        with torch.no_grad(), hidden_forwards():  # the teacher's forward is not the step's
            old_logits = self.teacher(*(a.to(self.device) for a in arguments)).to(outputs.device)
        return old_logits, widened_mask(self._old_classes, width)[:width].to(outputs.device)

    def _learned_classes(self, *taught: Optional[Tensor]) -> Optional[Tensor]:
        """The output units of every class trained on, held in memory, or marked in ``taught``."""
        held = list(self.memory.groups)  # type: ignore[attr-defined]
        widths = [int(m.numel()) for m in (self._seen_classes, *taught) if m is not None]
        width = max([*widths, *(c + 1 for c in held)], default=0)
        if width == 0:
            return None
        learned = widened_mask(self._seen_classes, width, self.device).clone().to(self.device)
        for mask in taught:
            if mask is not None:
                learned |= widened_mask(mask, width).to(self.device)[:width]
        if held:
            learned[torch.tensor(held, device=self.device)] = True
        return learned

    # ---------------------------------------------------------------------------- the task's end
    def _check_consolidation_data(self, task_id: int, data: Any) -> None:
        if data is None and self.memory_size > 0:
            raise ValueError(
                f"{self.method_name} chooses task {task_id}'s exemplars from its data when the task ends, and got "
                f"none: pass the task's data to register_task({task_id}, dataloader) (before or after training it)"
            )

    @override
    def _consolidate(self, task_id: int, data: Any) -> None:
        self._check_consolidation_data(task_id, data)  # before the memory changes
        super()._consolidate(task_id, data)  # the task's exemplars, chosen from its data
        self._before_snapshot(task_id)
        self.teacher = frozen_copy(self.model, self._capture, self.device)
        self._old_classes = self._learned_classes()

    def _before_snapshot(self, task_id: int) -> None:
        """At the task's end, once its exemplars are chosen, while the teacher is still the previous one."""

    # ---------------------------------------------------------------------------- Lightning side
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        distillers = [m for m in continual_methods(trainer) if isinstance(m, KnowledgeDistillation)]
        if stage == "fit" and distillers:
            raise ValueError(
                f"{self.method_name} and KnowledgeDistillation are on one Trainer: {self.paper_name} distils the "
                f"previous network's outputs itself ({self.own_distillation}), and the two would each rewrite the "
                f"step's loss. Use {self.method_name} alone"
            )

    @override
    def transform_lightning_loss(self, loss: Tensor, batch: Any) -> Tensor:
        arguments, outputs = self._captured_step("the logits of its loss")
        return self._method_loss(arguments, outputs, split_batch(batch)[1])

    @override
    def prepare_for_device(self) -> None:
        super().prepare_for_device()
        if self.teacher is not None:
            self.teacher.to(self.device)

    # ---------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "teacher": teacher_state(self.teacher),
            "seen_classes": self._seen_classes,
            "old_classes": self._old_classes,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.teacher = loaded_teacher(self.model, self._capture, self.device, state_dict.get("teacher"))
        seen, old = state_dict.get("seen_classes"), state_dict.get("old_classes")
        self._seen_classes = None if seen is None else seen.to(self.device)
        self._old_classes = None if old is None else old.to(self.device)
