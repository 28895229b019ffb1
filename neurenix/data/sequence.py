"""Training a task sequence with one ``Trainer``: :func:`fit_sequence` and what it needs.

One ``Trainer.fit`` per task, so the neurenix methods (and any callback) see
``on_train_start``/``on_train_end`` once per task, while the trainer's global step, epoch counter
and logger run on across tasks as one timeline. A checkpoint written anywhere in the sequence
resumes it (``ckpt_path``); an unreadable one is named, not handed to the user as PyTorch's error.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.data import sized_len
from lightning.pytorch.callbacks import Callback, OnExceptionCheckpoint
from typing_extensions import override

from neurenix.continual._checks import check_int
from neurenix.continual.distributed import spawn_refusal
from neurenix.data.datamodule import TaskSequenceDataModule

__all__ = ["fit_sequence", "unreadable_checkpoint_error"]


def fit_sequence(
    trainer: "pl.Trainer",
    model: "pl.LightningModule",
    datamodule: TaskSequenceDataModule,
    *,
    epochs_per_task: Optional[int] = None,
    steps_per_task: Optional[int] = None,
    ckpt_path: Optional[str] = None,
    keep_optimizer_state: bool = False,
) -> None:
    """Train the tasks from ``datamodule.current_task`` to the last, one ``trainer.fit`` each.

    The same ``trainer`` runs every fit: each task gets ``epochs_per_task`` epochs (or
    ``steps_per_task`` optimizer steps) more than the trainer had done when the task began,
    and the global step, the epoch counter and the logger continue across tasks. Each fit
    reloads the training loader of the current task, and callbacks see ``on_train_start`` and
    ``on_train_end`` once per task. After the call, ``datamodule.current_task`` is the last task.

    Lightning's own notes that every fit repeats (the model summary, "Checkpoint directory ...
    exists and is not empty", device lines) are shown once per sequence; notes that differ are
    all shown. An ``OnExceptionCheckpoint`` writes its checkpoint on an exception (``SIGTERM``
    included) as usual, but does not make each task's fit resume from the last checkpoint.

    **Optimizer state.** Lightning builds the optimizers afresh (``configure_optimizers``) at
    every fit, so by default each task starts with a new optimizer: Adam's moments and step count
    restart at every task. With ``keep_optimizer_state=True`` the sequence keeps one optimizer
    state, as reference code that builds one optimizer for the whole sequence does: every
    optimizer's ``state_dict()`` at the end of a task's fit (moments, step counts, and the
    param groups' hyper-parameters, the learning rate included) is loaded into the optimizers of
    the next task's fit before its first step. LR schedulers are not carried: each fit builds its
    own, which starts from the learning rate the previous task ended with. The optimizers must
    keep their structure from task to task (the same number, types, param groups and parameter
    shapes). A resumed fit gets the optimizer state Lightning restores from the checkpoint, so a
    run resumed from a checkpoint written anywhere, a task's last epoch end included, carries
    what the uninterrupted run would.

    Args:
        trainer: the ``Trainer`` for the whole sequence (its ``max_epochs``/``max_steps`` are
            set per task).
        model: the LightningModule.
        datamodule: the tasks.
        epochs_per_task: epochs per task; give this or ``steps_per_task``.
        steps_per_task: optimizer steps per task.
        ckpt_path: a checkpoint file written during an earlier ``fit_sequence`` run, at an epoch
            end or anywhere inside an epoch; the sequence resumes in the task it was saved in (the
            task travels in the checkpoint), at the batch it was saved after.
        keep_optimizer_state: carry the optimizers' state from each task's fit into the next
            (see above); ``False``: a fresh optimizer per task, Lightning's behaviour.

    Raises:
        TypeError: ``trainer`` or ``datamodule`` is of the wrong type, or a count is not an int.
        ValueError: neither or both of ``epochs_per_task``/``steps_per_task``, or one ``< 1``;
            a task whose training loader yields no batches (checked before its fit: Lightning
            would skip the fit and the task with it); ``ckpt_path`` unreadable (truncated,
            corrupt, not a Lightning checkpoint), not written while fitting this kind of
            datamodule, or saved in a task this datamodule does not have; a ``trainer`` whose
            strategy starts new processes for each fit (``ddp_spawn``, ``ddp_fork``: use
            ``strategy="ddp"``), refused before the first fit; with ``keep_optimizer_state=True``,
            a task whose ``configure_optimizers`` returns optimizers of another structure than the
            previous task's (raised inside that task's fit, before its first step).
        FileNotFoundError: ``ckpt_path`` does not exist (``IsADirectoryError``: it is a directory;
            ``PermissionError``: it cannot be read).

    Example::

        fit_sequence(trainer, model, datamodule, epochs_per_task=3)
        # resume after an interruption, with a new Trainer:
        fit_sequence(L.Trainer(...), model, datamodule, epochs_per_task=3, ckpt_path="last.ckpt")
    """
    if not isinstance(trainer, pl.Trainer):
        raise TypeError(f"trainer must be a lightning Trainer, got {type(trainer).__name__}")
    if not isinstance(datamodule, TaskSequenceDataModule):
        raise TypeError(f"datamodule must be a TaskSequenceDataModule, got {type(datamodule).__name__}")
    start_method = getattr(trainer.strategy, "_start_method", "popen")
    if start_method != "popen":  # refused here, in the parent, before the first fit starts processes
        raise ValueError(spawn_refusal("fit_sequence", start_method))
    unit, per_task = _checked_budget(epochs_per_task, steps_per_task)
    if not isinstance(keep_optimizer_state, bool):
        raise TypeError(f"keep_optimizer_state must be a bool, got {type(keep_optimizer_state).__name__}: {keep_optimizer_state!r}")
    if ckpt_path is not None:
        datamodule.load_state_dict(_checkpointed_datamodule_state(trainer, datamodule, ckpt_path))
    first = datamodule.current_task
    with _loggers_open_across_fits(trainer), _LightningNotesOnce() as notes, _optimizer_state_carried(trainer, keep_optimizer_state):
        for task in range(first, datamodule.num_tasks):
            resuming = ckpt_path is not None and task == first
            if not resuming:  # a resumed task keeps the start it had before the interruption
                datamodule.set_task(task)
            _check_task_yields_batches(trainer, datamodule)
            if not resuming:
                datamodule.task_start = {"epoch": trainer.current_epoch, "step": trainer.global_step}
            _limit_fit(trainer, unit, datamodule.task_start[unit] + per_task)
            notes.cover_new_loggers()
            with _exception_checkpoints_as_plain_callbacks(trainer, active=not resuming), _own_checkpoints_unremarked(task != first), \
                    _compiled_in_place_for_one_fit(model):
                trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path if resuming else None)
            if trainer.interrupted:  # a fit stopped by an exception it handled: later tasks would build on it
                return


#: The methods Lightning compiles in place when it fits a ``torch.compile``'d LightningModule.
_COMPILED_IN_PLACE = ("forward", "training_step", "validation_step", "test_step", "predict_step")


@contextlib.contextmanager
def _compiled_in_place_for_one_fit(model: Any) -> Iterator[None]:
    """Undo, after the fit, what ``Trainer.fit`` does to a ``torch.compile``'d LightningModule.

    Lightning sets the module's step methods (``forward``, ``training_step``, ...) to compiled
    functions of the methods the module has at that moment: from a sequence's second fit on, of
    the previous fit's compiled ones, one more wrapper per task. Put back on its class's methods
    after each fit, the module is wrapped once per fit, and dynamo's cache (kept per code object)
    is reused: nothing compiles again.
    """
    try:
        yield
    finally:
        module = getattr(model, "_orig_mod", None)
        if isinstance(module, pl.LightningModule) and getattr(module, "_compiler_ctx", None) is not None:
            context = module._compiler_ctx
            for name in _COMPILED_IN_PLACE:
                original = context.get(f"original_{name}")
                if getattr(original, "__self__", None) is module and getattr(original, "__func__", None) is getattr(type(module), name, None):
                    module.__dict__.pop(name, None)  # the class's own method again
                elif original is not None:
                    setattr(module, name, original)  # one set on the instance before the fit
            module._compiler_ctx = None


@contextlib.contextmanager
def _optimizer_state_carried(trainer: "pl.Trainer", active: bool) -> Iterator[None]:
    """With ``active``, a :class:`_OptimizerStateAcrossTasks` on ``trainer`` for the sequence's fits."""
    if not active:
        yield
        return
    carrier = _OptimizerStateAcrossTasks()
    trainer.callbacks.insert(0, carrier)  # first: the state is in place before any callback's on_train_start
    try:
        yield
    finally:
        trainer.callbacks.remove(carrier)


class _OptimizerStateAcrossTasks(Callback):
    """Every optimizer's state at the end of one fit, loaded into the next fit's optimizers.

    Made anew for each ``fit_sequence`` call, so the first fit, the only one that may resume from
    a checkpoint (whose optimizer state Lightning restores), never gets a carried state.
    Holds no checkpointed state of its own: a checkpoint holds the optimizers' state already.
    """

    def __init__(self) -> None:
        self._carried: Optional[list[dict[str, Any]]] = None  # each optimizer's state_dict()
        self._layout: list[tuple[str, list[list[tuple[int, ...]]]]] = []  # each optimizer's type and parameter shapes
        self._task: Any = None  # the task whose fit the state comes from

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._carried is None:
            return
        optimizers = trainer.optimizers
        self._check_layout(_layout(optimizers), trainer.datamodule.current_task)
        for optimizer, state in zip(optimizers, self._carried):
            optimizer.load_state_dict(state)

    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        optimizers = trainer.optimizers
        self._carried = [optimizer.state_dict() for optimizer in optimizers]
        self._layout = _layout(optimizers)
        self._task = trainer.datamodule.current_task

    def _check_layout(self, layout: list[tuple[str, list[list[tuple[int, ...]]]]], task: Any) -> None:
        difference = _first_difference(self._layout, layout, f"at task {self._task}", f"at task {task}")
        if difference is not None:
            raise ValueError(
                f"fit_sequence(keep_optimizer_state=True) cannot carry task {self._task}'s optimizer state into task "
                f"{task}: {difference}; configure_optimizers must return optimizers of the same number, types, param "
                "groups and parameter shapes at every task, or use keep_optimizer_state=False"
            )


def _first_difference(before: list, after: list, then: str, now: str) -> Optional[str]:
    """The first way two :func:`_layout` results differ, in words; ``None`` if they do not."""
    if len(before) != len(after):
        return f"configure_optimizers returned {len(before)} optimizer(s) {then} and {len(after)} {now}"
    for index, ((kind, groups), (new_kind, new_groups)) in enumerate(zip(before, after)):
        name = f"optimizer {index}"
        if kind != new_kind:
            return f"{name} is {kind} {then} and {new_kind} {now}"
        if len(groups) != len(new_groups):
            return f"{name} has {len(groups)} param group(s) {then} and {len(new_groups)} {now}"
        for group, (shapes, new_shapes) in enumerate(zip(groups, new_groups)):
            if len(shapes) != len(new_shapes):
                return f"param group {group} of {name} holds {len(shapes)} parameters {then} and {len(new_shapes)} {now}"
            for position, (shape, new_shape) in enumerate(zip(shapes, new_shapes)):
                if shape != new_shape:
                    return f"parameter {position} of param group {group} of {name} has shape {shape} {then} and {new_shape} {now}"
    return None


def _layout(optimizers: list[torch.optim.Optimizer]) -> list[tuple[str, list[list[tuple[int, ...]]]]]:
    """Each optimizer's type and its param groups' parameter shapes: what its state_dict() fits."""
    return [
        (type(optimizer).__name__, [[tuple(p.shape) for p in group["params"]] for group in optimizer.param_groups])
        for optimizer in optimizers
    ]


@contextlib.contextmanager
def _exception_checkpoints_as_plain_callbacks(trainer: "pl.Trainer", active: bool) -> Iterator[None]:
    """For a fit that starts from the state in memory: each ``OnExceptionCheckpoint`` behind a stand-in.

    Given an ``OnExceptionCheckpoint``, Lightning resumes every ``trainer.fit(ckpt_path=None)``
    from the newest "last" checkpoint it finds (its fault-tolerant mode): in a sequence, each task
    would restart from the checkpoint the previous task left, in the previous task. Behind a
    stand-in that passes every hook on, the callback still writes its checkpoint on an exception
    (a ``SIGTERM`` included), and the fit continues from the model and methods as they are.
    """
    callbacks = trainer.callbacks
    wrapped = [(index, callback) for index, callback in enumerate(callbacks) if isinstance(callback, OnExceptionCheckpoint)]
    if not active or not wrapped:
        yield
        return
    for index, callback in wrapped:
        callbacks[index] = _CallbackStandIn(callback)
    try:
        yield
    finally:
        for index, callback in wrapped:
            if isinstance(callbacks[index], _CallbackStandIn) and callbacks[index].callback is callback:
                callbacks[index] = callback


class _CallbackStandIn(Callback):
    """A callback that forwards every hook (and its state) to another one, under its own class."""

    def __init__(self, callback: Callback) -> None:
        self.callback = callback

    @property
    @override
    def state_key(self) -> str:
        return self.callback.state_key


def _forwarding(hook: str) -> Any:
    def forward(self: _CallbackStandIn, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.callback, hook)(*args, **kwargs)

    forward.__name__ = hook
    return forward


for _hook in [name for name, value in vars(Callback).items() if callable(value) and not name.startswith("_")]:
    setattr(_CallbackStandIn, _hook, _forwarding(_hook))
del _hook


@contextlib.contextmanager
def _own_checkpoints_unremarked(active: bool) -> Iterator[None]:
    """After the sequence's first fit, the checkpoint folder holds this sequence's own files:
    ModelCheckpoint's "exists and is not empty" would warn about them. The first fit still warns
    about files an earlier run left."""
    with warnings.catch_warnings():
        if active:
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
        yield


class _LightningNotesOnce:
    """Lightning's own log lines and warnings at most once per sequence (a context manager).

    Every fit repeats Lightning's set-up output: the model summary, "Checkpoint directory ...
    exists and is not empty" (shown again whenever the warning filters are reset, as under
    ``-W always`` or in a notebook), the device lines (``LOCAL_RANK: 0 - CUDA_VISIBLE_DEVICES``).
    Inside the context, a log record of a ``lightning.*`` logger whose level and text were shown
    already, or a warning issued from Lightning's code whose category and text were, is dropped;
    every line that differs (a new model summary, another value in a message) is shown, and
    nothing that is not Lightning's is touched.
    """

    def __init__(self) -> None:
        self._seen: set[tuple[Any, ...]] = set()
        self._filter = _FirstTimeOnly(self._seen)
        self._loggers: list[logging.Logger] = []
        self._showwarning: Any = None

    def __enter__(self) -> "_LightningNotesOnce":
        self.cover_new_loggers()
        self._showwarning = warnings.showwarning
        warnings.showwarning = self._show_once
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if warnings.showwarning == self._show_once:  # unless someone replaced it since
            warnings.showwarning = self._showwarning
        for logger in self._loggers:
            logger.removeFilter(self._filter)

    def cover_new_loggers(self) -> None:
        """Filter Lightning's loggers, those created since the last call included."""
        for name, logger in list(logging.Logger.manager.loggerDict.items()):
            if isinstance(logger, logging.Logger) and name.split(".")[0] == "lightning" and logger not in self._loggers:
                logger.addFilter(self._filter)
                self._loggers.append(logger)

    def _show_once(self, message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        key = ("warning", category, str(message))
        if _is_lightning_file(filename):
            if key in self._seen:
                return
            self._seen.add(key)
        self._showwarning(message, category, filename, lineno, file, line)


class _FirstTimeOnly(logging.Filter):
    def __init__(self, seen: set[tuple[Any, ...]]) -> None:
        super().__init__()
        self.seen = seen

    @override
    def filter(self, record: logging.LogRecord) -> bool:
        key = ("log", record.name, record.levelno, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


def _is_lightning_file(filename: str) -> bool:
    return Path(filename).resolve().is_relative_to(_LIGHTNING_DIR)


_LIGHTNING_DIR = Path(pl.__file__).resolve().parents[1]  # the `lightning` package


@contextlib.contextmanager
def _loggers_open_across_fits(trainer: "pl.Trainer") -> Iterator[None]:
    """The trainer's loggers only save at the end of each task's fit, and finalize once, at the end.

    Lightning finalizes its loggers at the end of every ``fit``: a ``TensorBoardLogger`` closes
    its writer, and the next task opens a new event file. Event files are named by the second
    they were opened and a process-wide counter, so within one second ``....10`` sorts before
    ``....9``, TensorBoard reads later tasks' points first and drops the earlier ones as orphans.
    Kept open, the whole sequence is one event file (one timeline, as the global step is).
    """
    loggers = list(trainer.loggers)
    own = [logger.__dict__.get("finalize") for logger in loggers]  # normally none: the class's method
    for logger in loggers:
        logger.finalize = functools.partial(_save_only, logger)  # type: ignore[method-assign]
    status = "failed"
    try:
        yield
        status = "failed" if trainer.interrupted else "success"
    finally:
        for logger, finalize in zip(loggers, own):
            if finalize is None:
                del logger.finalize
            else:
                logger.finalize = finalize  # type: ignore[method-assign]
            logger.finalize(status)


def _save_only(logger: Any, status: str) -> None:
    """What a logger does at the end of one task's fit: write out what it holds, stay open."""
    experiment = getattr(logger, "_experiment", None)
    if experiment is not None and hasattr(experiment, "flush"):
        experiment.flush()
    if status == "success":
        logger.save()


def _limit_fit(trainer: "pl.Trainer", unit: str, end: int) -> None:
    """Stop the next fit at epoch (or global step) ``end``, and at nothing else."""
    no_limit = -1
    if unit == "epoch":
        trainer.fit_loop.max_epochs = end
        trainer.fit_loop.epoch_loop.max_steps = no_limit
    else:
        trainer.fit_loop.max_epochs = no_limit
        trainer.fit_loop.epoch_loop.max_steps = end


def _check_task_yields_batches(trainer: "pl.Trainer", datamodule: TaskSequenceDataModule) -> None:
    """Refuse the current task before its fit if its training loader yields no batches.

    Lightning would skip such a fit ("No training batches"): the methods would never see the
    task, no hook would end it, and the sequence would go on as if it had been trained. Checked
    here rather than after the fit because a skipped fit still runs ``on_fit_end`` (where
    ``ForgettingCurves`` measures a task that a resumed fit finds complete). A loader without a
    length (an iterable dataset) cannot be counted before it runs and is not checked.
    """
    task = datamodule.current_task
    if trainer.limit_train_batches == 0:
        raise ValueError(
            f"task {task}'s training loader yields no batches: the Trainer was built with "
            f"limit_train_batches={trainer.limit_train_batches!r}, so fit_sequence would skip every task"
        )
    batches = sized_len(datamodule.train_dataloader())
    if batches == 0:
        raise ValueError(
            f"task {task}'s training loader yields no batches (train_dataloader() has length 0): "
            "fit_sequence would skip the task without training it"
        )


def _checked_budget(epochs_per_task: object, steps_per_task: object) -> tuple[str, int]:
    if (epochs_per_task is None) == (steps_per_task is None):
        raise ValueError(
            "give exactly one of epochs_per_task and steps_per_task, got "
            f"epochs_per_task={epochs_per_task!r} and steps_per_task={steps_per_task!r}"
        )
    if epochs_per_task is not None:
        return "epoch", check_int("epochs_per_task", epochs_per_task, minimum=1)
    return "step", check_int("steps_per_task", steps_per_task, minimum=1)


def _checkpointed_datamodule_state(trainer: "pl.Trainer", datamodule: TaskSequenceDataModule, ckpt_path: str) -> dict:
    # Read before the fit: the task (and so the fit's length) must be known before Lightning
    # restores the rest of the checkpoint inside `trainer.fit`.
    checkpoint = _read_checkpoint(trainer, ckpt_path)
    key = type(datamodule).__qualname__
    if key not in checkpoint:
        raise ValueError(f"ckpt_path={ckpt_path!r} holds no {key} state: it was not written while fitting a {key}")
    state = checkpoint[key]
    task = state.get("current_task")
    if isinstance(task, int) and task >= datamodule.num_tasks:
        raise ValueError(
            f"ckpt_path={ckpt_path!r} was saved in task {task}, but the datamodule has {datamodule.num_tasks} "
            f"tasks (0..{datamodule.num_tasks - 1}): the checkpoint was written by a sequence with more tasks "
            "than this datamodule has"
        )
    return state


def _read_checkpoint(trainer: "pl.Trainer", ckpt_path: str) -> dict:
    """The checkpoint at ``ckpt_path``, or an error that names the file and says what is wrong with it."""
    try:
        checkpoint = trainer.strategy.load_checkpoint(ckpt_path)
    except Exception as error:  # noqa: BLE001 - whatever torch.load met, the file is not a checkpoint it can read
        raise unreadable_checkpoint_error(ckpt_path, error) from None
    if not isinstance(checkpoint, dict) or "pytorch-lightning_version" not in checkpoint:
        held = f"a dict with keys {list(checkpoint)[:6]}" if isinstance(checkpoint, dict) else f"a {type(checkpoint).__name__}"
        raise ValueError(f"ckpt_path={ckpt_path!r} is not a Lightning checkpoint (it holds {held})")
    return checkpoint


def unreadable_checkpoint_error(ckpt_path: Any, error: BaseException) -> Exception:
    """The error to raise when loading ``ckpt_path`` failed with ``error``: it names the file and the cause.

    ``torch.load`` reports a truncated or corrupt file as ``OSError: [Errno 22]``, an ``EOFError``,
    a ``KeyError`` or an ``UnpicklingError`` that advises ``weights_only=False``: advice for a file
    of trusted Python objects, not for a damaged one. (Also for callbacks that see such an error
    in ``on_exception`` of a ``trainer.fit(ckpt_path=...)``.)
    """
    if isinstance(error, FileNotFoundError):
        return FileNotFoundError(f"ckpt_path={ckpt_path!r} does not exist")
    if isinstance(error, IsADirectoryError):
        return IsADirectoryError(f"ckpt_path={ckpt_path!r} is a directory, not a checkpoint file: pass a .ckpt file in it")
    if isinstance(error, PermissionError):
        return PermissionError(f"ckpt_path={ckpt_path!r} cannot be read: permission denied")
    objects = re.findall(r"GLOBAL ([\w.]+)", str(error)) if isinstance(error, pickle.UnpicklingError) else []
    if objects:
        return ValueError(
            f"ckpt_path={ckpt_path!r} holds Python objects that torch.load does not load by default "
            f"({', '.join(dict.fromkeys(objects))}); if you trust the file, allow them with "
            "torch.serialization.add_safe_globals([...]) before resuming"
        )
    return ValueError(
        f"ckpt_path={ckpt_path!r} cannot be read as a checkpoint: the file is truncated or corrupt, or is not a "
        f"checkpoint written by Lightning ({_load_failure(error)})"
    )


def _load_failure(error: BaseException) -> str:
    """What ``torch.load`` met, in one line, without its advice about ``weights_only``."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    text = " ".join(text.split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
