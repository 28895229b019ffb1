"""Gradient episodic memory: A-GEM (Chaudhry et al., ICLR 2019) and GEM (Lopez-Paz & Ranzato,
NeurIPS 2017).

Both keep an episodic memory of every earlier task and change the gradient of each step so that,
to first order, it does not increase the loss on those samples. They differ in the constraint:
A-GEM projects the gradient off one reference gradient (the loss on a batch drawn from all the
earlier tasks' samples) when the two conflict; GEM keeps one constraint per earlier task and solves
a small quadratic program. The memory, the reference gradients and where they enter the step are
one implementation, :class:`GradientEpisodicMethod`; each class is its constraint.

The gradient is changed where it is final: in ``train_step`` after ``backward`` and every penalty
(EWC, L2, SI), under a ``Trainer`` in ``on_before_optimizer_step`` (accumulated, all-reduced under
DDP, unscaled under AMP, not yet clipped). The reference gradients come from
``torch.autograd.grad`` of a separate forward on the memory (never accumulated into ``.grad``,
never a second optimizer step), so these methods need no ``ContinualLossMixin``.
"""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from neurenix.continual import functional as CF
from neurenix.continual._checks import check_int, check_model, check_real
from neurenix.continual.base import (
    model_arguments,
    running_statistics_kept,
    trainable_parameters,
)
from neurenix.continual.capture import hidden_forwards
from neurenix.continual.distributed import mean_across_ranks_, rank_and_world_size
from neurenix.continual.memory import TaskBalancedMemory
from neurenix.continual.rehearsal import RehearsalMethod

__all__ = ["AGEM", "GEM", "GradientEpisodicMethod"]


class GradientEpisodicMethod(RehearsalMethod):
    """An episodic memory of earlier tasks whose gradients constrain each step (A-GEM, GEM).

    The memory is a :class:`~neurenix.continual.memory.TaskBalancedMemory`: ``memory_size``
    samples split evenly over the tasks seen so far, each task's share a reservoir of its own
    stream. It fills while a task trains, as in GEM's code: ``train_step`` offers its batch after
    the optimizer step, a ``Trainer`` each training batch in ``on_train_batch_end``;
    ``add_to_memory`` is for samples that are not trained on (a tensor that ``train_step`` has just
    stored is not stored again, with a warning, so the loop of the Neurenix continual-learning
    API's replay tutorial, which calls both, stores each batch once). Only the
    samples of *finished* tasks (:attr:`finished_tasks`) ever enter a reference gradient, so the
    constraints come from earlier tasks only, exactly as when the memory is written at a task's
    end (A-GEM's paper); during the first task, and in a task-free stream that never ends a task,
    there is no reference and the step is plain training.

    Subclasses choose the reference samples (:meth:`_reference_groups`, one group per
    constraint) and the projection (:meth:`_project`).
    """

    needs_class_labels = True
    needs_loss_mixin = False

    def __init__(self, model: nn.Module, memory_size: int, device: Optional[torch.device], seed: Optional[int]) -> None:
        super().__init__(model, memory_size, device, seed, TaskBalancedMemory)

    # ---------------------------------------------------------------------------- shared core
    @override
    def after_optimizer_step(self, arguments: tuple[Tensor, ...], targets: Tensor) -> None:
        inputs = arguments[0]
        if self._claim_step_batch(inputs):  # every sample is of the task being trained
            self._remember(inputs.detach(), targets.detach(), self._task_ids_of(inputs, None))

    @override
    def project_gradients(self) -> None:
        # Every rank reaches the collective below at the same steps: finished_tasks is the same
        # on every rank, whatever each rank's memory holds.
        if not self.finished_tasks:
            return
        groups = self._reference_groups()
        distributed = rank_and_world_size()[1] > 1
        if not distributed and not any(slots.shape[0] for slots in groups):
            return
        params = list(trainable_parameters(self.model).values())
        if not params:
            return
        reference, used = self._reference_gradients(params, groups)
        # A parameter without a gradient counts as zero gradient; it takes part (gets a .grad)
        # where the reference may move it: always under DDP, where another rank's samples may
        # reach it and every rank must take the same step.
        taking_part = [p.grad is not None or used[i] or distributed for i, p in enumerate(params)]
        self._project([p for p, kept in zip(params, taking_part) if kept], _columns(reference, params, taking_part))

    def _reference_groups(self) -> list[Tensor]:
        """The memory slots of each constraint's samples (finished tasks only)."""
        raise NotImplementedError

    def _project(self, params: list[nn.Parameter], reference: Tensor) -> None:
        """Change ``params``' ``.grad`` given the reference gradients, ``(constraints, their size)``."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------- reference gradients
    def _reference_gradients(self, params: list[nn.Parameter], groups: list[Tensor]) -> tuple[Tensor, list[bool]]:
        """One row per group: the gradient of the mean cross-entropy of the model on the group's
        samples, flattened over ``params`` (float32 at least), averaged over every rank's samples;
        and, per parameter, whether any group's forward reached it on this rank."""
        dtype = torch.promote_types(params[0].dtype, torch.float32)
        # Written in place, row by row: no flattened copy of each gradient, no stacking.
        rows = torch.zeros(len(groups), sum(p.numel() for p in params), dtype=dtype, device=params[0].device)
        used = [False] * len(params)
        for row, slots in zip(rows, groups):
            if slots.shape[0] == 0:  # nothing of these tasks on this rank: it adds no samples
                continue
            for i, (part, g) in enumerate(zip(_split_like(row, params), self._memory_gradient(params, slots))):
                if g is not None:
                    part.copy_(g)
                    used[i] = True
        return _sample_mean_across_ranks(rows, [slots.shape[0] for slots in groups]), used

    def _memory_gradient(self, params: list[nn.Parameter], slots: Tensor) -> tuple[Optional[Tensor], ...]:
        """The gradient of the mean cross-entropy on the samples in ``slots`` (``None`` where a
        parameter is not reached), from a forward outside autocast, in the parameters' dtype and
        the model's current mode, that leaves batch-norm running statistics as they were."""
        batch = self.memory.take(slots)
        device = params[0].device
        inputs = batch.inputs.to(device)
        if inputs.is_floating_point():  # bf16-true, 64-true: stored as the batch came, run as the model is
            inputs = inputs.to(params[0].dtype)
        arguments = model_arguments(self.model, inputs, batch.task_ids.to(device))
        # The backward too: autograd runs it under the caller's autocast state.
        with torch.enable_grad(), torch.autocast(device.type, enabled=False), running_statistics_kept(self.model), hidden_forwards():
            outputs = self.model(*arguments)
            loss = F.cross_entropy(outputs.to(torch.promote_types(outputs.dtype, torch.float32)), batch.targets.to(device))
            return torch.autograd.grad(loss, params, allow_unused=True)

    # ---------------------------------------------------------------------------- Lightning side
    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # After the step (or, under gradient accumulation, after each micro-batch's backward):
        # the current task's samples never enter its own steps' references.
        self._remember_batch(batch)


class AGEM(GradientEpisodicMethod):
    """Averaged Gradient Episodic Memory: the step never points against the memory's gradient.

    With ``g`` the step's gradient and ``g_ref`` the gradient of the cross-entropy on
    ``reference_size`` samples drawn uniformly from the memory of all finished tasks,

    ``g ← g − (g·g_ref / g_ref·g_ref) g_ref``  if ``g·g_ref < 0``,

    and ``g`` is unchanged otherwise (and when ``g_ref = 0``). The dot products run over all the
    trainable parameters at once, in float32. One extra forward and backward over
    ``reference_size`` samples per step, no host-device synchronization.

    Paper: Chaudhry, Ranzato, Rohrbach & Elhoseiny, "Efficient Lifelong Learning with A-GEM",
    ICLR 2019.

    Args:
        model: the network being trained; its outputs are class logits (a multi-head model,
            ``forward(inputs, task_ids)``, gets each remembered sample's own task id).
        memory_size: samples kept, ``>= 0``, split evenly over the tasks seen so far (0: no
            reference, plain training).
        reference_size: memory samples per reference gradient, ``>= 1`` (all of them while the
            finished tasks hold fewer); the paper's ``256``.
        device: where the memory lives; ``None`` follows the model.
        seed: seeds the memory's sampling (which samples are kept, which form each reference
            batch); ``None`` derives one from PyTorch's initial seed.

    Under DDP each process keeps its own memory of its share of the stream and draws its own
    reference batch; the reference gradient is the mean over the samples of all of them (every
    rank's gradient sum and sample count all-reduced), so every rank projects onto the same
    ``g_ref`` and takes the same step.

    Example::

        agem = AGEM(model, memory_size=1000, reference_size=256)
        for task_id, loader in enumerate(task_loaders):
            for inputs, targets in loader:
                agem.train_step(optimizer, loss_fn, inputs, targets, task_id=task_id)
    """

    def __init__(
        self,
        model: nn.Module,
        memory_size: int = 1000,
        reference_size: int = 256,
        device: Optional[torch.device] = None,
        *,
        seed: Optional[int] = None,
    ) -> None:
        check_model(model)
        check_int("memory_size", memory_size, minimum=0)
        self.reference_size = check_int("reference_size", reference_size, minimum=1)
        super().__init__(model, memory_size, device, seed)

    def hyperparameters(self) -> dict[str, Any]:
        return {"memory_size": self.memory_size, "reference_size": self.reference_size}

    @override
    def _reference_groups(self) -> list[Tensor]:
        return [self.memory.draw_from(self.memory.slots_of(self.finished_tasks), self.reference_size)]

    @override
    def _project(self, params: list[nn.Parameter], reference: Tensor) -> None:
        grads = [_grad_or_zeros(p) for p in params]
        CF.agem_project_(grads, list(_split_like(reference[0], params)))


class GEM(GradientEpisodicMethod):
    """Gradient Episodic Memory: one constraint per earlier task, solved as a small quadratic program.

    With ``g`` the step's gradient and ``G`` the matrix whose row ``k`` is the gradient of the
    cross-entropy on all of finished task ``k``'s memory, ``g`` is kept if ``G g ≥ 0`` (no earlier
    task's loss increases to first order); otherwise it becomes ``z = g + Gᵀv``, ``v`` the solution
    of the dual ``min ½ vᵀGGᵀv + (Gg)ᵀv`` subject to ``v ≥ margin``
    (:func:`neurenix.continual.functional.gem_project`, an exact active-set solve in float64).
    Then ``G z ≥ 0``: the projected step increases no earlier task's memory loss, and a larger
    ``margin`` pushes it towards decreasing them.

    One forward and backward over the finished tasks' whole memory per step (one per task), and
    one host-device synchronization, which the maths needs: whether any constraint is violated
    and the ``K × K`` solve (``K`` finished tasks) are decided on the host.

    Paper: Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017.
    The margin is the authors' code's ``memory_strength`` (a bound on ``v`` in the QP); the paper
    adds it to the solution instead, which can break a constraint when earlier tasks' gradients
    conflict with each other.

    Args:
        model: the network being trained; its outputs are class logits (a multi-head model,
            ``forward(inputs, task_ids)``, gets each remembered sample's own task id).
        memory_size: samples kept, ``>= 0``, split evenly over the tasks seen so far (0: no
            constraint, plain training).
        margin: ``γ ≥ 0``, the lower bound on the dual variables; the authors' ``0.5``.
        device: where the memory lives; ``None`` follows the model.
        seed: seeds the memory's sampling (which samples are kept); ``None`` derives one from
            PyTorch's initial seed.

    Under DDP each process keeps its own memory of its share of the stream; each task's gradient
    is the mean over the samples of every rank's memory of that task (gradient sums and sample
    counts all-reduced), so every rank solves the same program and takes the same step.

    Example::

        gem = GEM(model, memory_size=1000, margin=0.5)
        for task_id, loader in enumerate(task_loaders):
            for inputs, targets in loader:
                gem.train_step(optimizer, loss_fn, inputs, targets, task_id=task_id)
    """

    def __init__(
        self,
        model: nn.Module,
        memory_size: int = 1000,
        margin: float = 0.5,
        device: Optional[torch.device] = None,
        *,
        seed: Optional[int] = None,
    ) -> None:
        check_model(model)
        check_int("memory_size", memory_size, minimum=0)
        self.margin = check_real("margin", margin, minimum=0.0)
        super().__init__(model, memory_size, device, seed)

    def hyperparameters(self) -> dict[str, Any]:
        return {"memory_size": self.memory_size, "margin": self.margin}

    @override
    def _reference_groups(self) -> list[Tensor]:
        return [self.memory.slots_of([task]) for task in self.finished_tasks]

    @override
    def _project(self, params: list[nn.Parameter], reference: Tensor) -> None:
        grad = _flat([p.grad for p in params], params, reference.dtype)
        projected = CF.gem_project(grad, reference, self.margin)
        if projected is grad:  # no constraint violated
            return
        for p, part in zip(params, _split_like(projected, params)):
            _grad_or_zeros(p).copy_(part)


# -------------------------------------------------------------------------------- helpers
def _flat(grads: Any, params: list[nn.Parameter], dtype: torch.dtype) -> Tensor:
    """``grads`` (``None`` as zeros) as one vector of ``dtype``."""
    return torch.cat(
        [
            (g.reshape(-1).to(dtype) if g is not None else torch.zeros(p.numel(), dtype=dtype, device=p.device))
            for g, p in zip(grads, params)
        ]
    )


def _split_like(flat: Tensor, params: list[nn.Parameter]) -> list[Tensor]:
    """Views of ``flat`` shaped like each of ``params``."""
    return [part.view_as(p) for part, p in zip(flat.split([p.numel() for p in params]), params)]


def _columns(reference: Tensor, params: list[nn.Parameter], kept: list[bool]) -> Tensor:
    """The columns of ``reference`` that belong to the ``kept`` parameters."""
    if all(kept):
        return reference
    parts = reference.split([p.numel() for p in params], dim=1)
    return torch.cat([part for part, keep in zip(parts, kept) if keep], dim=1)


def _grad_or_zeros(p: nn.Parameter) -> Tensor:
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    return p.grad


def _sample_mean_across_ranks(rows: Tensor, counts: list[int]) -> Tensor:
    """Each row (a mean over this rank's ``counts[k]`` samples) as the mean over every rank's samples.

    Sums and counts are all-reduced together and divided after: a rank holding none of a task's
    samples adds nothing, rather than a zero gradient that would shrink the mean. One collective.
    """
    if rank_and_world_size()[1] == 1:
        return rows
    weights = torch.tensor(counts, dtype=rows.dtype, device=rows.device).unsqueeze(1)
    carrier = mean_across_ranks_(torch.cat([rows * weights, weights], dim=1))
    sums, totals = carrier[:, :-1], carrier[:, -1:]
    # No rank holds the task: its sums are 0 and so is its row, which constrains nothing.
    return sums / torch.where(totals > 0, totals, torch.ones_like(totals))
