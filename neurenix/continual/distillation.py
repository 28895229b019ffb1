"""Knowledge distillation from the previous task's model (LwF-style: Li & Hoiem 2016; Hinton et al. 2015)."""

from __future__ import annotations

import copy
from numbers import Real
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn
from typing_extensions import override

from neurenix.continual import functional as CF
from neurenix.continual._checks import check_choice, check_model, check_real
from neurenix.continual.base import (
    eagerly,
    global_generator_kept,
    running_statistics_kept,
    takes_task_ids,
    uncompiled,
    widened_mask,
    without_compiled_forwards,
)
from neurenix.continual.callback import ContinualCallback, split_batch
from neurenix.continual.capture import CapturesTrainingForwards, ForwardCapture, hidden_forwards

__all__ = ["ALPHA_SCHEDULES", "KnowledgeDistillation"]

#: The named schedules ``KnowledgeDistillation(alpha=...)`` takes besides a number or a callable:
#: ``"1-1/t"``, α = 1 − 1/t at the ``t``-th task (½ at the second, ⅔ at the third): the teacher
#: weighs as the share of the tasks so far that it has learned, ``t − 1`` of ``t``.
ALPHA_SCHEDULES = ("1-1/t",)

Alpha = Union[float, str, Callable[[int], float]]


class KnowledgeDistillation(CapturesTrainingForwards, ContinualCallback):
    """Keep the model's outputs close to those of a frozen copy taken when the last task ended.

    From the second task on, the loss is
    ``(1 − alpha)·task_loss + alpha·T²·KL(softmax(teacher/T) ‖ softmax(student/T))`` on the
    current inputs, the teacher being a snapshot of the model (eval mode, no gradient) taken at
    the end of the previous task. During the first task the loss is the task loss.

    Args:
        model: the network being trained; its outputs are read as class logits.
        temperature: ``T > 0``.
        alpha: weight of the distillation term: a number in ``[0, 1]`` for every task; the
            string ``"1-1/t"``: ``α = 1 − 1/t`` with ``t`` = 1 + the number of tasks finished
            before the current one (0 for the first task, ½ for the second, ⅔ for the third);
            or a callable ``alpha(task_index) -> float`` of that number of finished tasks (from
            0), its value checked in ``[0, 1]`` when a task with a teacher starts and at each
            step. The checkpoint's state key holds the number, the string, or the callable's
            ``__qualname__``, so it stays the same all run long and a resumed run finds its
            state. :attr:`current_alpha` is the value in use.
        device: where the teacher lives; ``None`` follows the model.
        units: ``"all"`` output units, or ``"seen"``: only the units of classes met in the
            targets of earlier tasks (class-incremental runs, where later classes have no
            teacher knowledge worth keeping).

    Under a Trainer the LightningModule needs :class:`~neurenix.continual.ContinualLossMixin`;
    the student's outputs are those of the last forward of ``model`` inside ``training_step``.

    A multi-head model (its forward takes the task ids: ``model(inputs, task_ids)``) is distilled
    as in Learning without Forgetting: on every sample of the batch, the heads of the tasks the
    teacher learned (:attr:`finished_tasks`), student against teacher, averaged over those heads.
    The head of the task being learned is left to the task loss (its teacher head was never
    trained). This costs one extra forward of the student over the batch repeated once per
    learned task, and as much of the teacher; batch-norm running statistics are updated by the
    step's own forward only.

    Example::

        distillation = KnowledgeDistillation(model, temperature=2.0, alpha=0.5)
        ...train task 1...
        distillation.register_task(task_id=1, dataloader=task1_loader)  # snapshot = teacher
        for inputs, targets in task2_loader:
            distillation.train_step(optimizer, loss_fn, inputs, targets, task_id=2)
    """

    needs_loss_mixin = True

    def __init__(
        self,
        model: nn.Module,
        temperature: float = 2.0,
        alpha: Alpha = 0.5,
        device: Optional[torch.device] = None,
        *,
        units: str = "all",
    ) -> None:
        check_model(model)
        self.temperature = check_real("temperature", temperature, minimum=0.0, strict_minimum=True)
        self.alpha = _checked_alpha(alpha)
        self.units = check_choice("units", units, ("all", "seen"))
        super().__init__(model, device)
        self.teacher: Optional[nn.Module] = None
        self._seen_units: Optional[Tensor] = None
        self._teacher_units: Optional[Tensor] = None
        self._capture = ForwardCapture(model)
        self._heads: Optional[tuple[tuple[int, ...], Tensor]] = None  # see _learned_heads

    def hyperparameters(self) -> dict[str, Any]:
        alpha = self.alpha if isinstance(self.alpha, (float, str)) else _name_of(self.alpha)
        return {"temperature": self.temperature, "alpha": alpha, "units": self.units}

    @property
    def current_alpha(self) -> float:
        """α for the task being trained (or the next one, between tasks): ``alpha`` itself, or the
        schedule's value at the number of tasks finished so far.

        Raises:
            ValueError: a callable ``alpha`` returned something other than a number in ``[0, 1]``
                (the message names the value and the task).
        """
        index = len(self.finished_tasks)
        if isinstance(self.alpha, float):
            return self.alpha
        if self.alpha == "1-1/t":
            return 1.0 - 1.0 / (index + 1)
        return self._called_alpha(index)

    def _called_alpha(self, index: int) -> float:
        value = self.alpha(index)  # type: ignore[operator]
        task = f"task {self.active_task}" if self.active_task is not None else "the next task"
        if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 <= float(value) <= 1.0:
            raise ValueError(
                f"alpha={_name_of(self.alpha)} returned {value!r} for task index {index} ({task}, after "
                f"{index} finished task{'s' if index != 1 else ''}): it must be a number in [0, 1]"
            )
        return float(value)

    # ---------------------------------------------------------------------------- the continual-learning API
    def register_task(self, task_id: int, dataloader: Any = None) -> None:
        """Register a task; when it has been trained, the model is snapshotted as the teacher.

        The teacher replaces stored outputs: it answers for any input, replayed ones included.
        ``dataloader`` is read only with ``units="seen"`` when the task was trained outside
        ``train_step``, for the labels it holds.
        """
        super().register_task(task_id, dataloader)

    def get_distillation_loss(self, inputs: Union[Tensor, tuple[Tensor, ...]], outputs: Tensor) -> Tensor:
        """``T²·KL(softmax(teacher(inputs)/T) ‖ softmax(outputs/T))``, batch mean; 0 without a teacher.

        Unweighted: ``train_step`` uses ``(1 − alpha)·task_loss + alpha·`` this. ``inputs`` is
        the model's input, or a tuple of its arguments (``(inputs, task_ids)``). For a multi-head
        model given ``(inputs, task_ids)`` the term is taken over the heads of the learned tasks
        (see the class), from a forward of the model that this call runs: ``outputs`` is then
        only checked.

        Raises:
            TypeError: ``inputs`` or ``outputs`` is not a tensor.
        """
        arguments = CF.as_arguments(inputs)
        for name, value in (("inputs", arguments[0] if arguments else inputs), ("outputs", outputs)):
            if not isinstance(value, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if self.teacher is None:
            return torch.zeros((), device=outputs.device, dtype=outputs.dtype)
        if len(arguments) == 2 and takes_task_ids(self.model):
            return self._learned_heads_loss(arguments[0])
        with torch.no_grad(), eagerly():
            teacher_outputs = self.teacher(*(a.to(self.device) for a in arguments))
        units = None
        if self.units == "seen":
            units = self._teacher_units = widened_mask(self._teacher_units, outputs.shape[-1])
            if not bool(units.any()):
                return torch.zeros((), device=outputs.device, dtype=outputs.dtype)
        return CF.distillation_loss(outputs, teacher_outputs.to(outputs.device), self.temperature, units)

    def _learned_heads_loss(self, inputs: Tensor) -> Tensor:
        """LwF's term: every sample through the head of every task the teacher learned."""
        heads = self._learned_heads(inputs.device)
        task_ids = heads.repeat_interleave(inputs.shape[0])
        repeated = inputs.repeat(len(heads), *([1] * (inputs.dim() - 1)))
        with torch.no_grad(), eagerly():
            teacher_outputs = self.teacher(repeated.to(self.device), task_ids.to(self.device))
        with hidden_forwards(), running_statistics_kept(self.model):
            student_outputs = self.model(repeated, task_ids)
        return CF.distillation_loss(student_outputs, teacher_outputs.to(student_outputs.device), self.temperature)

    def _learned_heads(self, device: torch.device) -> Tensor:
        """The learned tasks' ids on ``device``, copied there only when they change (not every step)."""
        heads = tuple(sorted(set(self.finished_tasks)))
        if self._heads is None or self._heads[0] != heads or self._heads[1].device != device:
            self._heads = (heads, torch.tensor(heads, device=device))
        return self._heads[1]

    # ---------------------------------------------------------------------------- shared core
    @override
    def transform_loss(self, loss: Tensor, inputs: tuple[Tensor, ...], outputs: Any, targets: Tensor) -> Tensor:
        if self.units == "seen":
            self._record_units(outputs, targets)
        if self.teacher is None:
            return loss
        alpha = self.current_alpha
        return (1.0 - alpha) * loss + alpha * self.get_distillation_loss(inputs, outputs)

    def _record_units(self, outputs: Tensor, targets: Tensor) -> None:
        self._seen_units = widened_mask(self._seen_units, outputs.shape[-1], outputs.device)
        self._seen_units[targets.to(self._seen_units.device)] = True

    def _record_units_from(self, data: Any) -> None:
        """Mark the labels of a task's data (its training happened outside our view)."""
        with global_generator_kept():  # a shuffling loader's draws would shift the user's later ones
            for batch in data:
                targets = split_batch(batch)[1].to(self.device)
                self._seen_units = widened_mask(self._seen_units, int(targets.max()) + 1, self.device)
                self._seen_units[targets] = True

    def _begin_task(self, task_id: int) -> None:
        super()._begin_task(task_id)
        if self.teacher is not None and callable(self.alpha):
            self._called_alpha(len(self.finished_tasks))  # a bad value is refused before the task's first step

    def _consolidate(self, task_id: int, data: Any) -> None:
        if self.units == "seen" and self.steps_in_active_task == 0:
            if data is None:
                raise ValueError(
                    f"KnowledgeDistillation(units='seen') needs task {task_id}'s labels: pass its "
                    "dataloader to register_task, or train the task with train_step"
                )
            self._record_units_from(data)
        self.teacher = frozen_copy(self.model, self._capture, self.device)
        if self._seen_units is not None:
            self._teacher_units = self._seen_units.clone()

    # ---------------------------------------------------------------------------- Lightning side
    @override
    def transform_lightning_loss(self, loss: Tensor, batch: Any) -> Tensor:
        # Checked from the first step on, not only once a teacher exists: a model that
        # training_step never calls would otherwise fail at the second task, after the first trained.
        inputs, outputs = self._captured_step("the student's outputs")
        if self.teacher is None and self.units == "all":
            return loss
        return self.transform_loss(loss, inputs, outputs, split_batch(batch)[1])

    @override
    def prepare_for_device(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device)

    # ---------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "teacher": teacher_state(self.teacher),
            "seen_units": self._seen_units,
            "teacher_units": self._teacher_units,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.teacher = loaded_teacher(self.model, self._capture, self.device, state_dict.get("teacher"))
        device = self.device
        seen, taught = state_dict.get("seen_units"), state_dict.get("teacher_units")
        self._seen_units = None if seen is None else seen.to(device)
        self._teacher_units = None if taught is None else taught.to(device)


def _checked_alpha(alpha: object) -> Alpha:
    """``alpha`` as a float in ``[0, 1]``, a schedule's name, or a callable.

    Raises:
        TypeError / ValueError: anything else (the message names the value and the choices).
    """
    if isinstance(alpha, str):
        if alpha not in ALPHA_SCHEDULES:
            raise ValueError(
                f"alpha must be a number in [0, 1], one of {', '.join(map(repr, ALPHA_SCHEDULES))} or a callable "
                f"of the task index; got {alpha!r}"
            )
        return alpha
    if callable(alpha):
        return alpha  # type: ignore[return-value]
    return check_real("alpha", alpha, minimum=0.0, maximum=1.0)


def _name_of(function: Callable[..., Any]) -> str:
    """A callable's name for the state key: its ``__qualname__`` (a ``functools.partial``: its function's)."""
    name = getattr(function, "__qualname__", None) or getattr(getattr(function, "func", None), "__qualname__", None)
    return name or type(function).__qualname__


def frozen_copy(model: nn.Module, capture: ForwardCapture, device: torch.device) -> nn.Module:
    """A teacher: a copy of ``model`` on ``device``, in eval mode, without gradients.

    Copied with ``capture`` paused: the capture's hook on ``model`` must not follow it into the
    copy, or the teacher's forwards would pass for the student's. Shared by every method that
    distils from a snapshot (KnowledgeDistillation, ICaRL, BiC), so that they freeze alike.

    The teacher is eager by design, whether ``model`` was compiled by ``torch.compile(model)``,
    in place by Lightning, or holds compiled submodules (its forwards run under
    :func:`~neurenix.continual.base.eagerly`): a compiled teacher would compile again at every
    task's end (a new module each time). Its state is named as the module's own, loadable with or
    without compilation.
    """
    with capture.paused():
        teacher = without_compiled_forwards(copy.deepcopy(uncompiled(model)))
    teacher = teacher.to(device)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def teacher_state(teacher: Optional[nn.Module]) -> Optional[dict[str, Tensor]]:
    """The checkpoint's ``"teacher"`` entry: cloned tensors (the teacher may live on), or ``None``."""
    return None if teacher is None else {k: v.clone() for k, v in teacher.state_dict().items()}


def loaded_teacher(
    model: nn.Module, capture: ForwardCapture, device: torch.device, state: Optional[dict[str, Tensor]]
) -> Optional[nn.Module]:
    """The teacher a checkpoint's ``"teacher"`` entry describes (``None``: no teacher yet).

    ``model``'s architecture with the saved weights, frozen as :func:`frozen_copy` freezes.
    """
    if state is None:
        return None
    teacher = frozen_copy(model, capture, device)
    teacher.load_state_dict(state)
    return teacher
