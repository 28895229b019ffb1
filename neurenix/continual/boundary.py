"""Task boundaries found in the stream itself: a shift detector, and the callback that acts on it.

Aljundi et al. (2019, "Task-Free Continual Learning") consolidate when the training loss, after
a plateau, rises to a peak: the data changed. :class:`ShiftDetector` is that test on windows of
any per-step signal, framework-free (floats in, decisions out). :class:`TaskBoundaryDetector`
feeds it the loss (or the error rate) of each incoming batch *before* the model trains on it,
and at a detected shift makes every method consolidate exactly as at a given boundary: the task
that ended is finished (EWC's Fisher on that task's most recent batches, SI's Ω, the distillation
teacher, the L2 anchor) and the next task id is entered, in the middle of one ``Trainer.fit``.

Under DDP every rank computes the signal on its own shard and the sums and counts are
all-reduced before the division, so all ranks feed the detector the same number (an all-reduce
leaves bitwise-identical results on every process) and declare the same boundary at the same
step, with no further message.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any, Callable, Iterator, Optional, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DistributedSampler
from typing_extensions import override

from neurenix.continual._checks import check_batch, check_choice, check_int, check_model, check_real
from neurenix.continual.base import ContinualMethod, evaluation_mode, model_arguments
from neurenix.continual.callback import continual_methods, split_batch
from neurenix.continual.distributed import StaysInItsProcess, sum_across_ranks_

__all__ = ["SIGNALS", "ShiftDetector", "TaskBoundaryDetector"]

#: What :class:`TaskBoundaryDetector` watches: the loss of each incoming batch, or its error
#: rate (``1 − accuracy``); both rise when the data shifts.
SIGNALS = ("loss", "accuracy")


class ShiftDetector:
    """Declares a shift when a signal's newest values rise above the window before them.

    The last ``window + test_window`` values of the current segment are kept: the older
    ``window`` are the reference, the newest ``test_window`` the test. A shift is declared when
    the test values' mean exceeds the reference mean by more than ``threshold`` standard
    deviations of the reference values *and* by more than ``min_increase`` (a floor for a
    converged loss, whose standard deviation is tiny). The test is one-sided: a falling signal
    (learning) never triggers it. A long reference gives a steady estimate of the spread; a short
    test window reacts within a few steps (on split and permuted digits and Fashion-MNIST streams
    the defaults detected the loss-visible boundaries 0 to 3 steps late, and nothing in
    stationary streams). After a shift a new segment starts: its first ``warmup`` values are
    skipped (the fast transient of learning a new task) and the windows fill again, so two
    shifts are at least ``max(min_task_length, warmup + window + test_window)`` steps apart.

    Args:
        window: values in the reference window, ``>= 2``.
        test_window: newest values tested against the reference, ``>= 1``.
        threshold: the rise, in reference standard deviations, that counts as a shift, ``> 0``.
        min_increase: the smallest rise of the window mean that counts, in the signal's units
            (nats of loss; a fraction of the batch for the error rate), ``>= 0``.
        min_task_length: steps from one segment's start before a shift may end it, ``>= 0``.
        warmup: values skipped at the start of each segment, ``>= 0``.

    Example::

        detector = ShiftDetector(window=20, test_window=5)
        for step, loss in enumerate(losses):
            change = detector.update(loss)      # None, or the first step of the new segment
    """

    def __init__(
        self,
        window: int = 20,
        test_window: int = 5,
        threshold: float = 3.0,
        min_increase: float = 0.1,
        min_task_length: int = 0,
        warmup: int = 0,
    ) -> None:
        self.window = check_int("window", window, minimum=2)
        self.test_window = check_int("test_window", test_window, minimum=1)
        self.threshold = check_real("threshold", threshold, minimum=0.0, strict_minimum=True)
        self.min_increase = check_real("min_increase", min_increase, minimum=0.0)
        self.min_task_length = check_int("min_task_length", min_task_length, minimum=0)
        self.warmup = check_int("warmup", warmup, minimum=0)
        #: values seen, and the step at which the current segment began.
        self.steps = 0
        self.segment_start = 0
        self._values: deque[float] = deque(maxlen=self.window + self.test_window)

    def update(self, value: float) -> Optional[int]:
        """Add the next step's value; on a shift return the first step estimated to belong to the
        new segment (which then starts), else ``None``.

        The estimate is the first test-window step whose value alone clears the same bar
        (``mean + max(threshold·std, min_increase)`` of the reference), or the test window's
        first step if none does.

        Raises:
            FloatingPointError: ``value`` is NaN or infinite (training diverged).
        """
        value = float(value)
        if not math.isfinite(value):
            raise FloatingPointError(f"ShiftDetector got a non-finite signal value at step {self.steps}: {value!r}")
        step = self.steps
        self.steps += 1
        if step - self.segment_start < self.warmup:
            return None
        self._values.append(value)
        if len(self._values) < self.window + self.test_window or step - self.segment_start < self.min_task_length:
            return None
        values = list(self._values)
        reference, newest = values[: self.window], values[self.window :]
        mean = statistics.fmean(reference)
        bar = max(self.threshold * statistics.stdev(reference), self.min_increase)
        if statistics.fmean(newest) - mean <= bar:
            return None
        first_high = next((k for k, v in enumerate(newest) if v - mean > bar), 0)
        self.start_segment()
        return step - self.test_window + 1 + first_high

    def start_segment(self) -> None:
        """Begin a new segment at the next step (a boundary, detected or given)."""
        self.segment_start = self.steps
        self._values.clear()

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "segment_start": self.segment_start,
            "values": torch.tensor(list(self._values), dtype=torch.float64),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state.get("steps", 0))
        self.segment_start = int(state.get("segment_start", 0))
        self._values = deque(state.get("values", torch.zeros(0)).tolist(), maxlen=self.window + self.test_window)


class TaskBoundaryDetector(StaysInItsProcess, Callback):
    """Finds task boundaries in a stream without task labels, and consolidates the methods there.

    Every incoming training batch is first evaluated (``torch.no_grad``, eval mode: one extra
    forward, and one host synchronization per step to read the value) by ``model``: its loss
    (``signal="loss"``) or error rate (``signal="accuracy"``) feeds a :class:`ShiftDetector`. At
    a detected shift each method finishes its task, with the batches before the estimated change
    (the last ``recent_batches`` kept) as the task's data for EWC's Fisher, and enters the next
    task id; the batch that revealed the shift is trained as the new task. Should a task that
    began at a detected boundary end otherwise (the end of the fit, whose loader spans several
    tasks), its data are the batches kept then; a task that a fit began keeps the fit's loader.
    Boundaries are recorded in :attr:`boundaries` (the step at which each new task began) and
    :attr:`change_points` (where the shift is estimated to have started), and logged.

    Under a ``Trainer`` (put it in ``callbacks`` beside the methods; order does not matter):
    ``model`` defaults to the LightningModule and ``methods`` to the trainer's neurenix methods.
    Steps count training batches; with ``accumulate_grad_batches > 1`` a boundary waits for the
    next optimizer step to begin. The signal is logged as ``task_boundary/signal`` and each
    boundary as ``task_boundary/task`` (the new task id, at the step it began), e.g. TensorBoard
    markers. In a plain loop call :meth:`observe` on each batch before training on it.

    Args:
        model: evaluates the batches; its outputs are class logits. ``None``: the LightningModule.
        methods: the methods to consolidate. ``None``: the trainer's (none in a plain loop).
        window: values in the reference window (:class:`ShiftDetector`), ``>= 2``.
        test_window: newest values tested against the reference, ``>= 1``.
        threshold: the rise, in reference standard deviations, that counts as a shift, ``> 0``.
        min_increase: the smallest rise that counts, in the signal's units, ``>= 0``.
        min_task_length: batches from a task's start before a shift may end it, ``>= 0``.
        warmup: values skipped at the start of each task, ``>= 0``.
        signal: ``"loss"`` or ``"accuracy"``.
        loss_fn: ``loss_fn(outputs, targets)``, the batch's mean loss; default cross-entropy.
        recent_batches: batches kept for the consolidation's data, ``>= 1`` (default
            ``window + test_window``).

    Example::

        detector = TaskBoundaryDetector(window=20, test_window=5, threshold=3.0)
        trainer = L.Trainer(callbacks=[EWC(model.net), detector])
        trainer.fit(model, stream.train_dataloader())      # one fit over a task-free stream
        detector.boundaries                                # e.g. [36, 73, 108, 144]
    """

    def __init__(
        self,
        model: Optional[nn.Module] = None,
        methods: Optional[Sequence[ContinualMethod]] = None,
        *,
        window: int = 20,
        test_window: int = 5,
        threshold: float = 3.0,
        min_increase: float = 0.1,
        min_task_length: int = 0,
        warmup: int = 0,
        signal: str = "loss",
        loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
        recent_batches: Optional[int] = None,
    ) -> None:
        self.model = None if model is None else check_model(model)
        self.methods = None if methods is None else _checked_methods(methods)
        self.detector = ShiftDetector(window, test_window, threshold, min_increase, min_task_length, warmup)
        self.signal = check_choice("signal", signal, SIGNALS)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable or None, got {type(loss_fn).__name__}: {loss_fn!r:.80}")
        self.loss_fn = nn.functional.cross_entropy if loss_fn is None else loss_fn
        keep = self.detector.window + self.detector.test_window
        if recent_batches is not None:
            keep = check_int("recent_batches", recent_batches, minimum=1)
        self._recent: deque[tuple[int, Any]] = deque(maxlen=keep)
        #: the task being trained, the step at which each detected task began, and the first
        #: step each shift is estimated to have affected.
        self.current_task: Optional[int] = None
        self.boundaries: list[int] = []
        self.change_points: list[int] = []
        self.last_signal: Optional[float] = None
        self._pending_change: Optional[int] = None
        self._restored = False

    # ---------------------------------------------------------------------------- plain loop
    def observe(self, inputs: Tensor, targets: Tensor, task_ids: Optional[Tensor] = None) -> bool:
        """Look at the next batch of the stream before training on it.

        Returns:
            Whether a new task begins with this batch (the methods were consolidated, and
            :attr:`current_task` is the new id: train the batch under it).

        Raises:
            TypeError / ValueError: a bad batch, or no ``model`` was given.
        """
        check_batch(inputs, targets)
        if self.model is None:
            raise ValueError("TaskBoundaryDetector.observe needs the model: TaskBoundaryDetector(model, methods)")
        batch = (inputs, targets) if task_ids is None else (inputs, targets, task_ids)
        return self._step(self.model, self.methods or [], batch, may_switch=True, trainer=None)

    # ---------------------------------------------------------------------------- Lightning
    @property
    @override
    def state_key(self) -> str:
        detector = self.detector
        return self._generate_state_key(
            window=detector.window, test_window=detector.test_window, threshold=detector.threshold, signal=self.signal
        )

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit" and self.model is not None and not any(m is self.model for m in pl_module.modules()):
            raise ValueError(
                f"TaskBoundaryDetector's model ({type(self.model).__name__}) is not part of the LightningModule "
                f"being fit ({type(pl_module).__name__}): pass the LightningModule, a submodule of it, or None"
            )

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if _shuffled_by_lightning(trainer):
            rank_zero_warn(
                "TaskBoundaryDetector: Lightning's DistributedSampler shuffles the training data, which mixes "
                "the stream's tasks and hides their boundaries; pass Trainer(use_distributed_sampler=False) "
                "with a loader that keeps the stream's order under DDP (TaskStream.train_dataloader does)"
            )
        # A new fit is a given boundary (the methods consolidated at the last fit's end); a fit
        # resumed from a checkpoint goes on with the restored windows.
        if not self._restored:
            self.detector.start_segment()
            self._recent.clear()
            self._pending_change = None
        self._restored = False

    @override
    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> None:
        methods = continual_methods(trainer) if self.methods is None else self.methods
        optimizer_step_begins = batch_idx % trainer.accumulate_grad_batches == 0
        model = pl_module if self.model is None else self.model
        self._step(model, methods, batch, may_switch=optimizer_step_begins, trainer=trainer)
        batch_size = len(split_batch(batch)[1])
        pl_module.log("task_boundary/signal", self.last_signal, on_step=True, on_epoch=False, batch_size=batch_size)

    # ---------------------------------------------------------------------------- shared core
    def _step(self, model: nn.Module, methods: Sequence[ContinualMethod], batch: Any, *, may_switch: bool, trainer: Any) -> bool:
        actives = [m.active_task for m in methods if m.active_task is not None]
        if actives:
            self.current_task = max(actives)
        elif self.current_task is None:
            self.current_task = 0
        self.last_signal = self._signal_of(model, batch)
        step = self.detector.steps
        change = self.detector.update(self.last_signal)
        if change is not None:
            self._pending_change = change
        switched = self._pending_change is not None and may_switch
        if switched:
            self._switch_task(methods, step, trainer)
        self._recent.append((step, batch))
        return switched

    def _signal_of(self, model: nn.Module, batch: Any) -> float:
        """The batch's mean loss or error rate, over every rank's batch (sums reduced, then divided)."""
        inputs, targets, task_ids = split_batch(batch)
        device = next(model.parameters(), inputs).device
        with torch.no_grad(), evaluation_mode(model):
            arguments = model_arguments(model, inputs.to(device), None if task_ids is None else task_ids.to(device))
            outputs = model(*arguments)
            targets = targets.to(outputs.device)
            if self.signal == "loss":
                total = self.loss_fn(outputs, targets).detach().double() * targets.shape[0]
            else:
                total = (outputs.argmax(-1) != targets).sum().double()
        stats = torch.stack([total.reshape(()), torch.tensor(float(targets.shape[0]), dtype=torch.float64, device=total.device)])
        sum_across_ranks_([stats])
        total_sum, count = stats.tolist()
        return total_sum / count

    def _switch_task(self, methods: Sequence[ContinualMethod], step: int, trainer: Any) -> None:
        change = self._pending_change
        assert change is not None  # the caller checks
        ended = _Batches(deque((s, b) for s, b in self._recent if s < change))
        newer = [(s, b) for s, b in self._recent if s >= change]
        self._recent.clear()
        self._recent.extend(newer)
        next_task = max([self.current_task or 0, *(t for m in methods for t in m.finished_tasks)]) + 1
        for method in methods:
            if method.active_task is not None:
                method.set_task_data(ended if len(ended) else None)
                method.finish_task()
            method.enter_task(next_task)
            # Should this task end otherwise (the fit ends: the loader spans several tasks),
            # its data are the batches kept then.
            method.set_task_data(_Batches(self._recent))
        self.current_task = next_task
        self.boundaries.append(step)
        self.change_points.append(change)
        self._pending_change = None
        if trainer is not None:
            for logger in trainer.loggers:  # loggers write on rank 0 only
                logger.log_metrics({"task_boundary/task": float(next_task)}, step=trainer.global_step)
            rank_zero_info(
                f"TaskBoundaryDetector: task {next_task} begins at batch {step} (global step "
                f"{trainer.global_step}; shift estimated from batch {change})"
            )

    # ---------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "detector": self.detector.state_dict(),
            "current_task": self.current_task,
            "boundaries": list(self.boundaries),
            "change_points": list(self.change_points),
            "pending_change": self._pending_change,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output. The kept batches are not part of it: after a
        resume the next consolidation sees the batches from the resume on."""
        self.detector.load_state_dict(state_dict.get("detector", {}))
        self.current_task = state_dict.get("current_task")
        self.boundaries = list(state_dict.get("boundaries", []))
        self.change_points = list(state_dict.get("change_points", []))
        self._pending_change = state_dict.get("pending_change")
        self._recent.clear()
        self._restored = True


class _Batches:
    """Kept ``(step, batch)`` pairs seen as an iterable of batches (a method's task data)."""

    def __init__(self, kept: deque) -> None:
        self._kept = kept

    def __iter__(self) -> Iterator[Any]:
        return iter([batch for _, batch in self._kept])

    def __len__(self) -> int:
        return len(self._kept)


def _shuffled_by_lightning(trainer: "pl.Trainer") -> bool:
    """Whether the training loader's sampler is a shuffling ``DistributedSampler`` (Lightning's)."""
    loader = trainer.train_dataloader
    sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None) or getattr(loader, "sampler", None)
    return isinstance(sampler, DistributedSampler) and bool(sampler.shuffle)


def _checked_methods(methods: Sequence[Any]) -> list[ContinualMethod]:
    methods = list(methods)
    for index, method in enumerate(methods):
        if not isinstance(method, ContinualMethod):
            raise TypeError(f"methods[{index}] must be a neurenix continual method, got {type(method).__name__}")
    return methods
