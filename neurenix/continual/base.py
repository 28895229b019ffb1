"""The framework-free core every method shares: task bookkeeping, the training step, state.

Nothing here imports Lightning. :class:`ContinualMethod` is what the standalone door of the
Neurenix continual-learning API (``register_task``, ``train_step``, ...) runs on;
:mod:`neurenix.continual.callback` adapts the same object to Lightning's hooks.

Task registration is order-tolerant: a task is *consolidated* (Fisher, anchors, SI's
importance, the teacher) at the parameters it ended with, which is when

- the next task starts (``register_task`` or ``train_step`` with a new ``task_id``, or the next
  ``Trainer.fit`` of a sequence), or
- ``register_task`` is called for a task that has already been trained (by ``train_step`` under
  this object, or by any loop outside it: a change of the parameters since the object was made,
  or since the last consolidation, shows that).
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
import zlib
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch import Tensor, nn

from neurenix.continual._checks import check_batch, check_device, check_model, check_task_id

__all__ = [
    "ContinualMethod",
    "eagerly",
    "evaluation_mode",
    "global_generator_kept",
    "model_arguments",
    "requires_task_ids",
    "running_statistics_kept",
    "takes_task_ids",
    "trainable_parameters",
    "uncompiled",
    "widened_mask",
    "without_compiled_forwards",
]


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters that training can change (``requires_grad``), by name.

    Named as in the module itself, compiled or not (``torch.compile``'s wrapper would prefix every
    name with ``_orig_mod.``): a method's state saved with a compiled model loads into an eager one.
    """
    return {name: p for name, p in uncompiled(model).named_parameters() if p.requires_grad}


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, then restore each one's own previous mode."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, was_training in modes:
            module.training = was_training


@contextlib.contextmanager
def global_generator_kept() -> Iterator[None]:
    """Leave PyTorch's global CPU generator as it was, whatever draws from it inside.

    A method reading a task's data (EWC's Fisher) iterates DataLoaders, which draw a seed (and a
    shuffled order) from the global generator unless given their own: without this, adding a
    method would shift the user's later shuffles and dropout masks.
    """
    with torch.random.fork_rng(devices=[]):
        yield


_RUNNING_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


@contextlib.contextmanager
def running_statistics_kept(model: nn.Module) -> Iterator[None]:
    """Run an extra forward of ``model`` without it moving batch-norm running statistics.

    The forward updates copies; the originals are put back untouched (restoring them in place
    would change tensors that the step's own forward saved for its backward).
    """
    kept = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.training and module.running_mean is not None:
            originals = {name: getattr(module, name) for name in _RUNNING_STATISTICS}
            kept.append((module, originals))
            for name, tensor in originals.items():
                setattr(module, name, None if tensor is None else tensor.clone())
    try:
        yield
    finally:
        for module, originals in kept:
            for name, tensor in originals.items():
                setattr(module, name, tensor)


def widened_mask(mask: Optional[Tensor], width: int, device: Optional[torch.device] = None) -> Tensor:
    """A boolean mask over output units at least ``width`` long: ``mask`` extended with unmarked
    units (a new one on ``device`` when ``mask`` is ``None``)."""
    if mask is None:
        return torch.zeros(width, dtype=torch.bool, device=device)
    if mask.numel() >= width:
        return mask
    return torch.cat([mask, mask.new_zeros(width - mask.numel())])


#: model -> (the function of its forward method when last inspected, whether it takes task ids).
#: Reading a signature costs microseconds that every training step would pay; an entry is redone
#: when the forward changes, and goes with the model.
_TAKES_TASK_IDS: "weakref.WeakKeyDictionary[nn.Module, tuple[Callable[..., Any], bool]]" = weakref.WeakKeyDictionary()


def uncompiled(model: nn.Module) -> nn.Module:
    """The module that ``torch.compile`` wrapped (``model`` itself when it is not compiled).

    A compiled module's own ``forward`` takes ``(*args, **kwargs)``: the signature that says
    whether a model takes task ids is its original module's.
    """
    original = getattr(model, "_orig_mod", None)
    return original if isinstance(original, nn.Module) else model


@contextlib.contextmanager
def eagerly() -> Iterator[None]:
    """Run every ``torch.compile``'d module and function called inside without compiling them.

    For the paths that stay eager by design (docs/compile.md): a task's Fisher or importance, the
    teacher's forwards, exemplar features. It covers a model compiled by ``torch.compile(model)``,
    a submodule compiled inside an eager model, and a LightningModule whose ``forward`` Lightning
    compiled in place; no compilation starts and none is invalidated.

    Needs ``torch.compiler.set_stance`` (PyTorch 2.6): with an older PyTorch the block runs as it
    is (the paths above still call the module itself, not a ``torch.compile`` wrapper).
    """
    set_stance = getattr(torch.compiler, "set_stance", None)
    with set_stance("force_eager") if set_stance is not None else contextlib.nullcontext():
        yield


def without_compiled_forwards(copy: nn.Module) -> nn.Module:
    """``copy`` (a deep copy of a module) back on its class's step methods where Lightning compiled them in place.

    ``Trainer.fit(torch.compile(module))`` sets ``module.forward`` (and ``training_step``, ...) on
    the instance to compiled functions of the *original* module's bound methods (of the already
    compiled ones, from a sequence's second fit on): a deep copy keeps calling the original, so a
    teacher copied from it would answer with the student's weights. The copy drops them.
    """
    context = getattr(copy, "_compiler_ctx", None)
    if isinstance(context, dict):
        for key in context:
            if key.startswith("original_"):
                copy.__dict__.pop(key[len("original_"):], None)
        copy._compiler_ctx = None
    return copy


def takes_task_ids(model: nn.Module) -> bool:
    """Whether ``model``'s forward takes a second positional argument (a multi-head model's task ids)."""
    model = uncompiled(model)
    forward = model.forward
    function = getattr(forward, "__func__", None)
    if function is None or forward.__self__ is not model:  # a callable set on the instance: not cached
        return _forward_takes_task_ids(forward)
    try:
        known = _TAKES_TASK_IDS.get(model)
    except TypeError:  # a module made unhashable (an __eq__ without __hash__): not cached
        return _forward_takes_task_ids(forward)
    if known is not None and known[0] is function:
        return known[1]
    answer = _forward_takes_task_ids(forward)
    _TAKES_TASK_IDS[model] = (function, answer)
    return answer


def _forward_takes_task_ids(forward: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):  # a forward without a signature (a builtin): inputs only
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in positional)


def requires_task_ids(model: nn.Module) -> bool:
    """Whether ``model``'s forward cannot run without task ids: a second positional parameter with no default."""
    try:
        parameters = list(inspect.signature(uncompiled(model).forward).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 and positional[1].default is inspect.Parameter.empty


def model_arguments(model: nn.Module, inputs: Tensor, task_ids: Optional[Tensor]) -> tuple[Tensor, ...]:
    """The arguments to call ``model`` with: ``(inputs, task_ids)`` where it takes task ids, else ``(inputs,)``."""
    if task_ids is not None and takes_task_ids(model):
        return (inputs, task_ids)
    return (inputs,)


def _first_parameter(model: nn.Module) -> Optional[Tensor]:
    """``next(model.parameters(), None)`` without its generators (asked on every training step)."""
    if type(model).parameters is not nn.Module.parameters or type(model).named_parameters is not nn.Module.named_parameters:
        return next(model.parameters(), None)
    modules = [model]
    while modules:  # depth first, each module's own parameters before its children's
        module = modules.pop()
        for p in module._parameters.values():
            if p is not None:
                return p
        modules.extend(child for child in reversed(module._modules.values()) if child is not None)
    return None


def _fingerprint(model: nn.Module) -> Tensor:
    """Per-parameter sums and norms (float64, on the CPU): changes when training moves anything."""
    params = [p.detach() for p in model.parameters()]
    if not params:
        return torch.zeros(0, dtype=torch.float64)
    sums = torch.stack([p.sum(dtype=torch.float64) for p in params])
    norms = torch.stack([p.double().norm() for p in params])
    return torch.cat([sums, norms]).cpu()


def default_seed(salt: str) -> int:
    """A method's seed when none is given: PyTorch's initial seed, salted per method.

    ``seed_everything`` (or ``torch.manual_seed``) thus makes runs repeatable, every DDP rank
    seeded alike gets the same seed, and, unlike a draw, it leaves the global generator alone,
    so adding a method does not change the model's initialization or the data order.
    """
    return (torch.initial_seed() + zlib.crc32(salt.encode())) % 2**63


def inputs_as_given(inputs: Any) -> Any:
    """The identity: a method's inputs need no conversion outside a Lightning fit."""
    return inputs


class ContinualMethod:
    """Task bookkeeping and the training step shared by every continual-learning method.

    Subclasses implement the hooks they need:

    - :meth:`_begin_task` / :meth:`_consolidate`: a task starts / ends (state at end-of-task
      parameters);
    - :meth:`extend_batch`: add samples to a training batch (replay);
    - :meth:`transform_loss`: change the loss before ``backward`` (distillation);
    - :meth:`observe_gradients`: read the gradient of the unregularized loss (SI);
    - :meth:`add_penalty_gradients`: add a penalty's closed-form gradient (EWC, L2, SI);
    - :meth:`transform_outputs`: change the outputs the loss sees (ER-ACE);
    - :meth:`project_gradients`: change the final gradient (A-GEM, GEM);
    - :meth:`after_optimizer_step`: the step on a batch is taken (A-GEM and GEM remember it).
    """

    def __init__(self, model: nn.Module, device: Union[None, str, torch.device] = None) -> None:
        self.model = check_model(model)
        self._requested_device = check_device(device)
        self._check_model_device()
        self.active_task: Optional[int] = None
        self.finished_tasks: list[int] = []
        self.steps_in_active_task = 0
        self._task_data: Any = None
        #: Applied to the inputs of batches the method reads itself (EWC's Fisher): under a
        #: Lightning fit, its precision's conversion (``bf16-true`` casts inputs to bfloat16).
        self._convert_inputs: Callable[[Any], Any] = inputs_as_given
        self._untouched_fingerprint = _fingerprint(model)

    # ---------------------------------------------------------------------------- device
    @property
    def device(self) -> torch.device:
        """Where the method keeps its state: the ``device`` given, else the model's."""
        if self._requested_device is not None:
            return self._requested_device
        first = _first_parameter(self.model)
        return first.device if first is not None else torch.device("cpu")

    def _check_model_device(self) -> None:
        wanted = self._requested_device
        if wanted is None:
            return
        for name, p in self.model.named_parameters():
            if not _same_device(p.device, wanted):
                raise ValueError(
                    f"device={str(wanted)!r} was given but the model's parameter {name!r} is on "
                    f"{str(p.device)!r}; move the model with model.to({str(wanted)!r}) or pass "
                    "device=None to follow the model"
                )

    # ---------------------------------------------------------------------------- tasks
    def register_task(self, task_id: int, dataloader: Any = None) -> None:
        """Register a task: before training it, or after (then it is consolidated now).

        Args:
            task_id: an ``int`` naming the task; a task cannot be registered again once it has
                been consolidated.
            dataloader: the task's data, where the method needs it (EWC's Fisher); may be
                ``None`` and supplied later.

        Raises:
            TypeError: ``task_id`` is not an ``int``.
            ValueError: ``task_id`` names a task that was already consolidated.
        """
        task_id = self._check_new_or_active(task_id)
        self._check_model_device()
        if task_id == self.active_task:
            if dataloader is not None:
                self._task_data = dataloader
            if self._active_task_was_trained():
                self._finish_active_task()
            return
        if self.active_task is not None:
            self._finish_active_task()
        self._start_task(task_id, dataloader)
        if self._trained_outside_view():
            self._finish_active_task()

    def enter_task(self, task_id: int, data: Any = None) -> None:
        """Make ``task_id`` the task being trained, consolidating the previous one if it differs."""
        task_id = self._check_new_or_active(task_id)
        if task_id == self.active_task:
            return
        if self.active_task is not None:
            self._finish_active_task()
        self._start_task(task_id, data)

    def finish_task(self, data: Any = None) -> None:
        """Consolidate the task being trained now (a Lightning fit of a task has ended)."""
        if self.active_task is None:
            return
        if data is not None and self._task_data is None:
            self._task_data = data
        self._finish_active_task()

    def set_task_data(self, data: Any) -> None:
        """Give the task being trained the data its consolidation will read, replacing any.

        EWC computes its Fisher from it when the task ends; the other methods ignore it. A
        boundary detector hands over the batches of the task that just ended this way.

        Raises:
            ValueError: no task is being trained.
        """
        if self.active_task is None:
            raise ValueError(f"{type(self).__name__}.set_task_data: no task is being trained (enter_task first)")
        self._task_data = data

    def _check_new_or_active(self, task_id: object) -> int:
        """``task_id`` as an int, refused if that task was already consolidated."""
        task_id = check_task_id(task_id)
        if task_id in self.finished_tasks:
            so_far = self.finished_tasks + ([self.active_task] if self.active_task is not None else [])
            being_trained = "" if self.active_task is None else f"; task {self.active_task} is being trained"
            raise ValueError(
                f"task_id={task_id} was already trained and consolidated (tasks so far: {so_far}"
                f"{being_trained}); a later task needs a new task_id. (register_task counts a "
                "task as trained when the parameters changed since the method was created or since "
                "the last task: create the method after loading pretrained weights.)"
            )
        return task_id

    def _check_registered_task_is_trained(self, task_id: int) -> None:
        """Refuse a train_step whose id would end a registered task that nothing has trained.

        ``register_task(0, ...)`` then ``train_step(..., task_id=1)`` is almost always a task
        numbering mismatch (a loop counting from 1, a sequence from 0): going on would consolidate
        task 0 at parameters that never learned it. A task trained before the method existed
        (pretrained weights) is ended explicitly with ``register_task`` of the next task.
        """
        active = self.active_task
        if active is None or task_id == active or self._active_task_was_trained():
            return
        raise ValueError(
            f"train_step got task_id={task_id} while task {active} is registered and no step has trained it: "
            f"going on would consolidate task {active} at parameters that never learned it. Give train_step "
            f"the id the task was registered with (task_id={active}): ids are yours to choose, register_task "
            f"and train_step must agree. If task {active} was learned before this method existed (pretrained "
            f"weights), end it first with register_task({task_id}, ...)"
        )

    def _active_task_was_trained(self) -> bool:
        return self.steps_in_active_task > 0 or self._trained_outside_view()

    def _trained_outside_view(self) -> bool:
        return not torch.equal(_fingerprint(self.model), self._untouched_fingerprint)

    def _start_task(self, task_id: int, data: Any) -> None:
        self.active_task = task_id
        self.steps_in_active_task = 0
        self._task_data = data
        self._begin_task(task_id)

    def _finish_active_task(self) -> None:
        task_id, data = self.active_task, self._task_data
        assert task_id is not None  # internal invariant: callers check
        self._consolidate(task_id, data)
        self.finished_tasks.append(task_id)
        self.active_task = None
        self.steps_in_active_task = 0
        self._task_data = None
        self._untouched_fingerprint = _fingerprint(self.model)

    # ---------------------------------------------------------------------------- training step
    def train_step(
        self,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        inputs: Tensor,
        targets: Tensor,
        task_id: int,
    ) -> Tensor:
        """One optimization step on a batch of ``task_id`` with this method's protection.

        Zeroes the gradients, runs the model (on the batch plus any replayed samples), applies
        the method's loss and gradient terms, and steps the optimizer. The model's train/eval
        mode is left as the caller set it. A model whose ``forward`` takes a second positional
        argument (a multi-head model) is called as ``model(inputs, task_ids)``.

        Args:
            optimizer: steps the model's parameters.
            loss_fn: ``loss_fn(outputs, targets)`` returning a scalar.
            inputs: the batch's inputs ``(N, ...)``; moved to the method's device.
            targets: the batch's targets ``(N, ...)``; moved to the method's device.
            task_id: the task this batch belongs to; a new id ends (consolidates) the previous
                task first.

        Returns:
            The loss that was back-propagated (detached); penalties added in closed form
            (EWC, L2, SI) are not part of it: read them with the method's ``get_*_loss()``.

        Raises:
            TypeError / ValueError: bad inputs, targets or task_id (nothing is changed then).
        """
        check_batch(inputs, targets)
        task_id = self._check_new_or_active(task_id)
        self._check_registered_task_is_trained(task_id)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self._check_model_device()
        device = self.device
        inputs, targets = inputs.to(device), targets.to(device)
        self.prepare_for_device()
        self.enter_task(task_id)

        optimizer.zero_grad()
        multi_head = takes_task_ids(self.model)
        task_ids = None
        if multi_head:  # a multi-head model gets each sample's task id
            task_ids = torch.full((inputs.shape[0],), task_id, dtype=torch.long, device=inputs.device)
        inputs, targets, task_ids = self.extend_batch(inputs, targets, task_ids)
        arguments = (inputs, task_ids) if multi_head and task_ids is not None else (inputs,)
        outputs = self.transform_outputs(arguments, self.model(*arguments), targets)
        loss = self.transform_loss(loss_fn(outputs, targets), arguments, outputs, targets)
        loss.backward()
        self.observe_gradients()
        self.add_penalty_gradients()
        self.project_gradients()
        optimizer.step()
        self.after_optimizer_step(arguments, targets)
        self.steps_in_active_task += 1
        return loss.detach()

    # ---------------------------------------------------------------------------- hooks
    def _begin_task(self, task_id: int) -> None:
        """A task starts at the current parameters."""

    def _consolidate(self, task_id: int, data: Any) -> None:
        """A task ended at the current parameters: compute what protects it."""

    def extend_batch(
        self, inputs: Tensor, targets: Tensor, task_ids: Optional[Tensor]
    ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """Return the batch to train on (replay appends remembered samples)."""
        return inputs, targets, task_ids

    def transform_outputs(self, arguments: tuple[Tensor, ...], outputs: Tensor, targets: Tensor) -> Tensor:
        """Return the model's outputs on the step's batch as the loss should see them (ER-ACE masks
        the classes absent from the batch). ``arguments`` are those the model was called with."""
        return outputs

    def transform_loss(self, loss: Tensor, inputs: tuple[Tensor, ...], outputs: Any, targets: Tensor) -> Tensor:
        """Return the loss to back-propagate (distillation mixes in the teacher's term).

        ``inputs`` are the arguments the model was called with (``(inputs,)`` or
        ``(inputs, task_ids)``).
        """
        return loss

    def observe_gradients(self) -> None:
        """Read the gradients of the unregularized loss, before any penalty is added."""

    def add_penalty_gradients(self) -> None:
        """Add the penalty's gradient to ``.grad`` (after unscaling, before clipping)."""

    def project_gradients(self) -> None:
        """Change the final gradient (every penalty added; before clipping): A-GEM, GEM."""

    def after_optimizer_step(self, arguments: tuple[Tensor, ...], targets: Tensor) -> None:
        """The step on this batch is taken (A-GEM and GEM remember its samples).

        ``arguments`` are those the model was called with (``(inputs,)`` or ``(inputs, task_ids)``),
        the batch as extended by :meth:`extend_batch`.
        """

    def prepare_for_device(self) -> None:
        """Move the method's state to :attr:`device` if the model has moved."""

    # ---------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The whole state as plain containers of tensors, ints and strings.

        Loads with ``torch.load(..., weights_only=True)``; the model's own weights are not part
        of it.
        """
        return {
            "active_task": self.active_task,
            "finished_tasks": list(self.finished_tasks),
            "steps_in_active_task": self.steps_in_active_task,
            "untouched_fingerprint": self._untouched_fingerprint.clone(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; keys that older versions lacked get defaults."""
        self.active_task = state_dict.get("active_task")
        self.finished_tasks = list(state_dict.get("finished_tasks", []))
        self.steps_in_active_task = int(state_dict.get("steps_in_active_task", 0))
        fingerprint = state_dict.get("untouched_fingerprint")
        self._untouched_fingerprint = fingerprint.cpu() if fingerprint is not None else _fingerprint(self.model)
        self._task_data = None


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    return a.index is None or b.index is None or a.index == b.index
