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
_STEP_METHODS = "_neurenix_methods_of_the_step"


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
        super().manual_backward(_with_terms_for_backward(self, loss), *args, **kwargs)  # type: ignore[misc]


def _with_continual_terms(step: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(step)
    def training_step(self: Any, batch: Any, *args: Any, **kwargs: Any) -> Any:
        # A subclass's training_step calling super().training_step() is wrapped twice: only
        # the outermost call applies the methods.
        if self.__dict__.get(_INSIDE_STEP):
            return step(self, batch, *args, **kwargs)
        # Under torch.compile only this function is traced, never the methods themselves: they
        # stay out of its locals (a compiled frame would guard on their types).
        active, batch = _begin_step(self, batch)
        if not active:  # a string, guarded by value (see _begin_step)
            return step(self, batch, *args, **kwargs)
        self.__dict__[_INSIDE_STEP] = True
        try:
            output = step(self, batch, *args, **kwargs)
        finally:
            self.__dict__[_INSIDE_STEP] = False
            self.__dict__.pop(_TERMS_FOR_BACKWARD, None)
        return _end_step(self, output, batch)

    setattr(training_step, _WRAPPED, True)
    return training_step


@torch.compiler.disable
def _begin_step(module: Any, batch: Any) -> tuple[str, Any]:
    """Which neurenix methods act on this step (``""``: none), and the batch they extend (each
    then told the forward comes); the methods are kept on ``module`` for :func:`_end_step`.

    Eager under ``torch.compile``, as :func:`_end_step` (see the module's docstring). The first
    value names the forward captures installed (distillation's, DER's, ER-ACE's): a compiled
    frame is specialized on it, so that a step traced without a capture's hook (dynamo does not
    guard on module hooks) is never reused where a capture must see the forward.
    """
    methods = continual_methods(getattr(module, "_trainer", None))
    if not methods:
        return "", batch
    for method in methods:
        batch = method.extend_lightning_batch(batch)
    for method in methods:
        method.before_training_forward()
    module.__dict__[_STEP_METHODS] = methods
    if not module.automatic_optimization:  # back-propagated inside the step: the terms go to its first manual_backward
        module.__dict__[_TERMS_FOR_BACKWARD] = (methods, batch)
    captures = [getattr(method, "_capture", None) for method in methods]
    installed = [capture for capture in captures if getattr(capture, "installed", False)]
    return "methods, captures " + " ".join(str(id(capture)) for capture in installed), batch


@torch.compiler.disable
def _end_step(module: Any, output: Any, batch: Any) -> Any:
    """The step's output with the methods' terms in its loss (with manual optimization: as it is)."""
    methods = module.__dict__.pop(_STEP_METHODS)
    if not module.automatic_optimization:
        return output
    return _map_loss(output, lambda loss: _apply_terms(methods, loss, batch))


@torch.compiler.disable
def _with_terms_for_backward(module: Any, loss: Tensor) -> Tensor:
    """``loss`` with the methods' terms if it is the step's first ``manual_backward`` (eager, as :func:`_end_step`)."""
    terms = module.__dict__.pop(_TERMS_FOR_BACKWARD, None)
    if terms is None:
        return loss
    methods, batch = terms
    return _apply_terms(methods, loss, batch)


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
