"""The outputs of the model inside a LightningModule's ``training_step``, read by a forward hook.

Methods whose loss terms need the model's outputs on the step's batch (distillation's student,
Dark Experience Replay's logits) or change them (ER-ACE's masking) cannot ask ``training_step``
for them: the user's code owns the forward. A forward hook on the method's model sees it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from neurenix.continual.callback import fitted_module

__all__ = ["CapturesTrainingForwards", "ForwardCapture", "hidden_forwards", "no_forward_message"]

#: How many :func:`hidden_forwards` blocks are open: while any is, no capture records or transforms.
_hidden_depth = 0


@contextlib.contextmanager
def hidden_forwards() -> Iterator[None]:
    """Run a method's own extra forwards (memory batches, reference gradients, distillation's
    heads) unseen by every capture: another method on the Trainer must not read them as the
    step's outputs, nor ER-ACE mask them."""
    global _hidden_depth
    _hidden_depth += 1
    try:
        yield
    finally:
        _hidden_depth -= 1

#: ``transform(arguments, outputs) -> outputs``: replaces what the forward returns to its caller.
OutputTransform = Callable[[tuple[Tensor, ...], Tensor], Tensor]


class ForwardCapture:
    """Records the last forward of ``model`` run with gradients enabled, while installed.

    Forwards without gradients (evaluation, a teacher) and forwards of other modules are ignored.
    With ``transform``, the captured forward returns ``transform(arguments, outputs)`` instead of
    its outputs, and that is what is recorded.
    """

    def __init__(self, model: nn.Module, transform: Optional[OutputTransform] = None) -> None:
        # A compiled LightningModule is fitted, and so called, as the module it wraps.
        self.model = fitted_module(model)
        self.transform = transform
        self.arguments: Optional[tuple[Tensor, ...]] = None
        self.output: Optional[Tensor] = None
        self._handle: Optional[torch.utils.hooks.RemovableHandle] = None

    @property
    def installed(self) -> bool:
        return self._handle is not None

    def install(self) -> None:
        """Start recording (a fit's training starts); a second call changes nothing."""
        if self._handle is None:
            self._handle = self.model.register_forward_hook(self._record)

    def remove(self) -> None:
        """Stop recording (training ends, or fails)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def clear(self) -> None:
        """Forget the last forward (a step starts)."""
        self.arguments = self.output = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Run forwards the capture must not see, or copy the model without the hook (a deep copy
        would otherwise copy the method that owns the hook too)."""
        installed = self.installed
        self.remove()
        try:
            yield
        finally:
            if installed:
                self.install()

    def _record(self, module: nn.Module, args: tuple, output: Any) -> Optional[Tensor]:
        if _hidden_depth or module is not self.model or not torch.is_grad_enabled() or not args:
            return None
        if not isinstance(output, Tensor):
            return None
        arguments = tuple(args)
        if self.transform is not None:
            output = self.transform(arguments, output)
        self.arguments, self.output = arguments, output
        return output


class CapturesTrainingForwards:
    """For a method with a :class:`ForwardCapture` in ``self._capture``: the capture is installed
    while a fit trains, cleared before each step, and read with :meth:`_captured_step`.

    Mixed in before :class:`~neurenix.continual.ContinualCallback` (its hooks call ``super()``).
    """

    _capture: ForwardCapture

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_train_start(trainer, pl_module)  # type: ignore[misc]
        self._capture.install()

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._capture.remove()
        super().on_train_end(trainer, pl_module)  # type: ignore[misc]

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._capture.remove()
        super().on_exception(trainer, pl_module, exception)  # type: ignore[misc]

    def before_training_forward(self) -> None:
        self._capture.clear()
        super().before_training_forward()  # type: ignore[misc]

    def _captured_step(self, needed: str) -> tuple[tuple[Tensor, ...], Tensor]:
        """The step's captured ``(arguments, outputs)``, then forgotten.

        Raises:
            RuntimeError: ``training_step`` ran no forward of the method's model (``needed``
                says what the method reads from it).
        """
        arguments, output = self._capture.arguments, self._capture.output
        if arguments is None or output is None:
            raise RuntimeError(no_forward_message(type(self).__name__, self._capture.model, needed))
        self._capture.clear()
        return arguments, output


def no_forward_message(owner: str, model: nn.Module, needed: str = "the outputs it reads") -> str:
    """Why ``owner`` could not read the model's outputs in ``training_step``, and what to give it."""
    name = type(model).__name__
    hint = (
        f" {name} is the LightningModule: if training_step calls a submodule (`self.net(x)`) rather than "
        f"`self(x)`, give that submodule, e.g. {owner}(model.net)"
        if isinstance(model, pl.LightningModule)
        else f" Give {owner} the module whose outputs training_step turns into the loss"
    )
    return (
        f"{owner} saw no forward of its model ({name}) in training_step: {needed} must come "
        f"from the model given to it (with gradients enabled).{hint}"
    )
