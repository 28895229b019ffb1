"""The one change a LightningModule needs for replay and distillation: a mixin.

EWC, L2 and SI work on any LightningModule (their penalties enter the gradient in closed form
from a callback hook). Replay adds samples to the training batch and distillation mixes a term
into the loss; only the module's ``training_step`` sees both, so the mixin wraps it.

Under ``torch.compile`` (``Trainer.fit(torch.compile(module))``), Lightning compiles the module's
``forward`` and ``training_step`` in place, the wrapper included. The methods' part of the step
(replay's draw from memory, the teacher's and the memory's forwards, the loss terms) runs eagerly
by design: it reads and changes Python state (memory sizes, counters, generators) that a compiled
frame would guard on and recompile for as it changes, step after step. The step you wrote, with
its forward, stays compiled.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import Tensor

from neurenix.continual.callback import continual_methods

__all__ = ["ContinualLossMixin"]

_INSIDE_STEP = "_neurenix_inside_training_step"
_WRAPPED = "_neurenix_wraps_training_step"
_TERMS_FOR_BACKWARD = "_neurenix_terms_for_manual_backward"


class ContinualLossMixin:
    """Mix into a ``LightningModule`` (before it) to let every neurenix method act on its steps.

    The ``training_step`` you write stays as it is; the mixin wraps it so that, while a
    ``Trainer`` with neurenix callbacks is fitting:

    - the batch it receives already holds the replayed samples (``ExperienceReplay``), with the
      same structure (``(inputs, targets)`` or ``(inputs, targets, task_ids)``);
    - the loss it returns (a tensor, or a dict with ``"loss"``) gets the methods' terms
      (``KnowledgeDistillation``: ``(1 − α)·loss + α·T²·KL``) before Lightning back-propagates it.

    Without neurenix callbacks on the trainer, ``training_step`` runs untouched.

    With manual optimization (``self.automatic_optimization = False``) the loss is
    back-propagated inside ``training_step``: the methods' terms join the loss of the step's
    first ``self.manual_backward(loss)``, computed from the model's outputs in that step; later
    ``manual_backward`` calls of the same step are left as they are.

    Example::

        class Classifier(ContinualLossMixin, L.LightningModule):
            def __init__(self):
                super().__init__()
                self.net = torch.nn.Sequential(torch.nn.Linear(64, 10))

            def forward(self, x):
                return self.net(x)

            def training_step(self, batch, batch_idx):
                x, y = batch
                return torch.nn.functional.cross_entropy(self(x), y)
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # The class's own training_step, or one inherited from a base without the mixin.
        step = getattr(cls, "training_step", None)
        if step is not None and not getattr(step, _WRAPPED, False):
            cls.training_step = _with_continual_terms(step)  # type: ignore[attr-defined]

    def manual_backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """``LightningModule.manual_backward``, the methods' terms added to the step's first loss."""
        terms = self.__dict__.pop(_TERMS_FOR_BACKWARD, None)
        if terms is not None:
            methods, batch = terms
            loss = _apply_terms(methods, loss, batch)
        super().manual_backward(loss, *args, **kwargs)  # type: ignore[misc]


def _with_continual_terms(step: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(step)
    def training_step(self: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
        # A subclass's training_step calling super().training_step() is wrapped twice: only
        # the outermost call applies the methods.
        if self.__dict__.get(_INSIDE_STEP):
            return step(self, batch, *args, **kwargs)
        methods, batch = _methods_and_batch(self, batch)
        if not methods:
            return step(self, batch, *args, **kwargs)
        manual = not self.automatic_optimization
        if manual:  # back-propagated inside the step: the terms go to its first manual_backward
            self.__dict__[_TERMS_FOR_BACKWARD] = (methods, batch)
        self.__dict__[_INSIDE_STEP] = True
        try:
            output = step(self, batch, *args, **kwargs)
        finally:
            self.__dict__[_INSIDE_STEP] = False
            self.__dict__.pop(_TERMS_FOR_BACKWARD, None)
        if manual:
            return output
        return _map_loss(output, lambda loss: _apply_terms(methods, loss, batch))

    setattr(training_step, _WRAPPED, True)
    return training_step


@torch.compiler.disable
def _methods_and_batch(module: Any, batch: Any) -> tuple[list, Any]:
    """The trainer's neurenix methods and the batch they extend (each then told the forward comes).

    Eager under ``torch.compile``, as :func:`_apply_terms` (see the module's docstring).
    """
    methods = continual_methods(getattr(module, "_trainer", None))
    for method in methods:
        batch = method.extend_lightning_batch(batch)
    for method in methods:
        method.before_training_forward()
    return methods, batch


@torch.compiler.disable
def _apply_terms(methods: list, loss: Tensor, batch: Any) -> Tensor:
    for method in methods:
        loss = method.transform_lightning_loss(loss, batch)
    return loss


def _map_loss(output: Any, change: Callable[[Tensor], Tensor]) -> Any:
    if output is None:  # Lightning skips the batch
        return None
    if isinstance(output, Tensor):
        return change(output)
    if isinstance(output, dict) and isinstance(output.get("loss"), Tensor):
        return {**output, "loss": change(output["loss"])}
    raise TypeError(
        "training_step must return a loss tensor, a dict with a 'loss' tensor, or None; "
        f"got {type(output).__name__}"
    )
