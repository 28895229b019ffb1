"""BiC: bias correction for class-incremental learning (Wu et al., CVPR 2019).

A network trained on the new classes' data and a few exemplars of the old ones favours the new
classes: they had many more samples. BiC trains as usual (cross-entropy mixed with distillation
from the previous network), then, at each task's end, fits two scalars ``α, β`` that rescale the
new classes' logits, ``α·z + β``, on a held-out part of the exemplars where old and new classes
are balanced; the correction is frozen and applies at prediction time.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor, nn
from typing_extensions import override

from neurenix.continual import functional as CF
from neurenix.continual._checks import check_real
from neurenix.continual.base import evaluation_mode, model_arguments, uncompiled, widened_mask
from neurenix.continual.capture import hidden_forwards
from neurenix.continual.distilled_exemplars import DistilledExemplars
from neurenix.continual.distributed import all_gather_objects
from neurenix.continual.memory import ReplayBatch

__all__ = ["BiC", "BiasCorrectedClassifier", "BIAS_L2", "held_out_ranks"]

#: The fit's pull towards no correction, ``l2/2·((α − 1)² + β²)``: small beside the cross-entropy,
#: it keeps the minimum finite where the held-out set is separable by the correction alone.
BIAS_L2 = 1e-3


def held_out_ranks(ranks: Tensor, fraction: float) -> Tensor:
    """Which exemplars (by their rank in their class's selection order) are held out for the
    bias fit: rank ``r`` is iff ``⌊(r + 1)·f⌋ > ⌊r·f⌋``, so that any prefix of ``q`` ranks holds
    ``⌊q·f⌋`` of them, spread evenly (``f = 0.1``: ranks 9, 19, 29, ...). A class that shrinks to its
    first ranks keeps the same share held out, and the split never moves an exemplar between parts."""
    r = ranks.double()
    return torch.floor((r + 1) * fraction + 1e-9) > torch.floor(r * fraction + 1e-9)


class BiC(DistilledExemplars):
    """BiC: distillation and exemplars, and a bias correction of the new classes' logits.

    Wu, Chen, Wang, Ye, Liu, Guo & Fu, "Large Scale Incremental Learning", *CVPR* 2019.

    **The memory.** ``memory_size`` exemplars in all, split evenly over the classes seen
    (:class:`~neurenix.continual.memory.ExemplarMemory`, chosen by ``selection`` at each task's
    end from its data). In each class the exemplars at the ranks :func:`held_out_ranks` marks,
    a share ``held_out`` (the paper's 9:1 split: ``0.1``), are the held-out (validation) set: never
    replayed, used only to fit the correction. A new class's held-out exemplars are taken from the
    task's data as its training exemplars are, so old and new classes have the same number held out
    (balanced, as the paper's validation set). The paper keeps the new classes' validation samples
    out of training; here they are chosen at the task's end from the data it trained on (a Trainer's
    fit cannot hide samples from its own dataloader), so the new classes' held-out logits are those
    of seen samples: see docs/methods/bic.md.

    **Training** (stage 1). Every step trains on the new batch plus ``round(replay_ratio · B)``
    exemplars drawn uniformly from the training part of the memory (appended to the batch as
    :class:`~neurenix.continual.ExperienceReplay` does). The loss back-propagated is
    ``λ·L_d + (1 − λ)·L_c`` (:func:`~neurenix.continual.functional.bic_loss`), ``λ = n_old / (n_old
    + n_new)`` the old classes' share of the classes learned, ``L_c`` the cross-entropy over the
    classes learned so far and ``L_d`` the temperature-``T`` soft cross-entropy of the old
    classes' softmax against that of the network frozen at the last task's end (the teacher),
    both networks' logits bias-corrected by the corrections fitted so far (as the paper's
    frozen bias layers are). It *replaces* the loss that ``loss_fn`` (or ``training_step``) computes.

    **At each task's end** (stage 2): the exemplars are chosen; the network, frozen (eval mode, no
    gradient), gives the logits of every held-out exemplar (of all ranks under DDP, gathered, so that
    every rank fits the same ``α, β``); ``(α, β)`` of the task's new classes minimize the cross-entropy
    of the corrected logits (:func:`~neurenix.continual.functional.fit_bias_correction`: a Newton
    fit in float64 of two scalars on cached logits, with the pull :data:`BIAS_L2` towards no
    correction), then stay frozen; the teacher is snapshotted. The first task has no old classes:
    no correction (``α = 1, β = 0``), as in the paper.

    **Prediction.** :attr:`classifier` (a :class:`BiasCorrectedClassifier`) returns the corrected
    logits of the classes learned (``−inf`` for classes never learned); ``model(x)`` stays the
    network's own output, so the head's accuracy and the corrected one can be reported side by
    side, e.g. ``ForgettingCurves(..., predictor=bic.classifier)``. The ``neurenix`` command and
    ``GridSearch`` measure a method's ``classifier`` when it has one.

    Args:
        model: the network being trained; its outputs are read as one logit per class (targets
            are class labels below the number of output units).
        memory_size: exemplars kept in all, training and held-out parts together, ``>= 0``
            (0: no exemplars and no correction; distillation alone).
        feature_extractor: with ``selection="herding"`` or ``"closest"``, the submodule of ``model``
            (or its name) whose output ranks the samples; ``None`` for an ``nn.Sequential`` model
            takes its second-to-last child.
        replay_ratio: exemplars appended per new sample in each step, ``>= 0``.
        device: where the memory and the teacher live; ``None`` follows the model.
        seed: seeds the memory's draws; ``None`` derives one from PyTorch's initial seed.
        selection: how exemplars are chosen: ``"herding"`` (as iCaRL), ``"random"`` or ``"closest"``.
        held_out: the share of each class's exemplars held out for the bias fit, in ``(0, 0.5]``.
        temperature: the distillation's temperature ``T > 0`` (the paper's 2).

    Under a Trainer the LightningModule needs :class:`~neurenix.continual.ContinualLossMixin`;
    the exemplars are chosen from the fit's training data at its end. Under DDP each rank chooses
    from its own shard and keeps its own memory (``memory_size`` each, all in the checkpoint);
    the correction is fitted on every rank's held-out logits. In a plain loop, give each task's
    data to :meth:`register_task` (before or after training it).

    Example::

        bic = BiC(model, memory_size=2000, feature_extractor=model[0])
        for task_id, loader in enumerate(task_loaders):
            for inputs, targets in loader:
                bic.train_step(optimizer, loss_fn, inputs, targets, task_id=task_id)
            bic.register_task(task_id, loader)  # exemplars, then the bias correction
        predictions = bic.classifier.predict(test_inputs)
    """

    method_name = "BiC"
    paper_name = "BiC"
    own_distillation = "its λ-weighted soft cross-entropy on the old classes"

    def __init__(
        self,
        model: nn.Module,
        memory_size: int = 2000,
        feature_extractor: Union[None, str, nn.Module] = None,
        replay_ratio: float = 0.5,
        device: Optional[torch.device] = None,
        *,
        seed: Optional[int] = None,
        selection: str = "herding",
        held_out: float = 0.1,
        temperature: float = 2.0,
    ) -> None:
        self.held_out = check_real("held_out", held_out, minimum=0.0, strict_minimum=True, maximum=0.5)
        self.temperature = check_real("temperature", temperature, minimum=0.0, strict_minimum=True)
        super().__init__(model, memory_size, feature_extractor, replay_ratio, device, seed, selection)
        self.classifier = BiasCorrectedClassifier(self)
        #: Per output unit, the frozen correction ``scale · z + shift`` (1 and 0 where none).
        self.scale: Optional[Tensor] = None
        self.shift: Optional[Tensor] = None
        #: ``(task_id, α, β)`` of every correction fitted, in order.
        self.corrections: list[tuple[int, float, float]] = []
        #: The memory's layout (samples offered, held, its rank storage) and the replayed slots
        #: found in it: exemplars change only when a task's are chosen or a state is loaded.
        self._training_slots: Optional[tuple[tuple[int, int, Optional[Tensor]], Tensor]] = None

    @override
    def _default_features(self, model: nn.Module, selection: str) -> Optional[nn.Module]:
        return None if selection == "random" else _default_features(uncompiled(model), selection)

    def hyperparameters(self) -> dict[str, Any]:
        return {**super().hyperparameters(), "held_out": self.held_out, "temperature": self.temperature}

    # ---------------------------------------------------------------------------- the memory's two parts
    def _held_out_mask(self) -> Tensor:
        """Which stored exemplars are held out (a bool per slot)."""
        size = len(self.memory)
        if size == 0:
            return torch.zeros(0, dtype=torch.bool, device=self.memory.device)
        ranks = self.memory.field(self.memory.rank_field, torch.arange(size, device=self.memory.device))  # type: ignore[attr-defined]
        return held_out_ranks(ranks, self.held_out)

    def training_slots(self) -> Tensor:
        """The slots of the exemplars that are replayed (all but the held-out ones).

        Searched once per set of exemplars (a read from the device) and kept while the memory
        holds the same ones: every step replays from them without a synchronization.
        """
        memory = self.memory
        layout = (memory.num_seen, len(memory), memory._fields.get(memory.rank_field))  # type: ignore[attr-defined]
        kept = self._training_slots
        if kept is None or kept[0][:2] != layout[:2] or kept[0][2] is not layout[2]:
            kept = self._training_slots = (layout, torch.nonzero(~self._held_out_mask()).flatten())
        return kept[1]

    def held_out_slots(self) -> Tensor:
        """The slots of the held-out exemplars (the bias fit's validation set)."""
        return torch.nonzero(self._held_out_mask()).flatten()

    @override
    def _replayed(self, count: int) -> Optional[ReplayBatch]:
        slots = self.training_slots()  # the held-out exemplars are never replayed
        if slots.numel() == 0:
            return None
        return self.memory.take(self.memory.draw_from(slots, count))

    # ---------------------------------------------------------------------------- shared core
    @override
    def _method_loss(self, inputs: Union[Tensor, tuple[Tensor, ...]], outputs: Tensor, targets: Tensor) -> Tensor:
        return self.bic_loss(inputs, outputs, targets)

    def bic_loss(self, inputs: Union[Tensor, tuple[Tensor, ...]], outputs: Tensor, targets: Tensor) -> Tensor:
        """BiC's loss on a batch (see the class): ``outputs`` the model's on ``inputs`` (a tensor,
        or the tuple of its arguments), distilled from the teacher's on the same inputs.

        Raises:
            ValueError: ``outputs`` not one row of logits per target.
        """
        teacher = self._read_step(inputs, outputs, targets)
        width = outputs.shape[1]
        classes = widened_mask(self._learned_classes(), width)[:width].to(outputs.device)
        corrected = self.corrected(outputs)
        if teacher is None:
            return CF.bic_loss(corrected, targets, classes)
        old_logits, old_classes = teacher
        return CF.bic_loss(corrected, targets, classes, self.corrected(old_logits), old_classes, self.temperature)

    def corrected(self, logits: Tensor) -> Tensor:
        """``logits`` with the frozen corrections applied (units without one as they are)."""
        if self.scale is None or self.shift is None:
            return logits
        width = logits.shape[-1]
        scale, shift = _widened(self.scale, width, 1.0), _widened(self.shift, width, 0.0)
        return CF.bias_corrected(logits, scale[:width], shift[:width])

    @override
    def _learned_classes(self, *taught: Optional[Tensor]) -> Optional[Tensor]:
        """The output units of every class trained on, held in memory, or learned by the teacher."""
        return super()._learned_classes(self._old_classes, *taught)

    # ---------------------------------------------------------------------------- the task's end
    @override
    def _before_snapshot(self, task_id: int) -> None:
        if self.memory_size > 0 and self._old_classes is not None:  # the same on every rank
            self._fit_correction(task_id)
        self.training_slots()  # found now, at the task's end: the next task's steps read nothing

    def _fit_correction(self, task_id: int) -> None:
        """Stage 2: ``(α, β)`` of the classes new in this task, fitted on every rank's held-out logits."""
        logits, labels = self._held_out_logits()
        learned = self._learned_classes()
        gathered = all_gather_objects((logits.cpu(), labels.cpu(), None if learned is None else learned.cpu()))
        width = max([int(g[2].numel()) for g in gathered if g[2] is not None] + [int(g[0].shape[1]) for g in gathered if g[0].numel()])
        union = torch.zeros(width, dtype=torch.bool)
        for _, _, mask in gathered:
            if mask is not None:
                union |= widened_mask(mask, width)[:width]
        assert self._old_classes is not None
        new = union & ~widened_mask(self._old_classes.cpu(), width)[:width]
        rows = [g[0] for g in gathered if g[0].numel()]
        all_logits = torch.cat(rows).double()[:, :width] if rows else torch.zeros(0, width, dtype=torch.float64)
        all_labels = torch.cat([g[1] for g in gathered]).long()
        if not bool(new.any()) or all_labels.numel() == 0:
            return
        columns = union[: all_logits.shape[1]]
        alpha, beta = CF.fit_bias_correction(all_logits[:, columns], _reindexed(all_labels, columns), new[: all_logits.shape[1]][columns], l2=BIAS_L2)
        self.scale = _widened(self.scale, width, 1.0).clone()
        self.shift = _widened(self.shift, width, 0.0).clone()
        self.scale[new], self.shift[new] = alpha, beta
        self.corrections.append((task_id, alpha, beta))

    def _held_out_logits(self) -> tuple[Tensor, Tensor]:
        """The corrected logits (old corrections only) and labels of this rank's held-out exemplars."""
        slots = self.held_out_slots()
        device = _first_device(self.model)
        rows, labels = [torch.zeros(0, 0)], [torch.zeros(0, dtype=torch.long)]
        with torch.no_grad(), evaluation_mode(self.model), hidden_forwards():
            for chunk in slots.split(512):
                stored = self.memory.take(chunk)
                inputs = self._convert_inputs(stored.inputs.to(device))
                outputs = self.model(*model_arguments(self.model, inputs, stored.task_ids.to(device)))
                rows.append(self.corrected(outputs).double().cpu())
                labels.append(stored.targets.cpu())
        return (torch.cat(rows[1:]) if slots.numel() else rows[0]), torch.cat(labels)

    # ---------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "scale": None if self.scale is None else self.scale.clone(),
            "shift": None if self.shift is None else self.shift.clone(),
            "corrections": torch.tensor([[t, a, b] for t, a, b in self.corrections], dtype=torch.float64).reshape(-1, 3),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        scale, shift = state_dict.get("scale"), state_dict.get("shift")
        self.scale = None if scale is None else scale.clone()
        self.shift = None if shift is None else shift.clone()
        corrections = state_dict.get("corrections")
        self.corrections = [] if corrections is None else [(int(t), float(a), float(b)) for t, a, b in corrections.tolist()]


class BiasCorrectedClassifier:
    """BiC's prediction: the network's logits with the frozen corrections, ``−inf`` for the
    classes never learned. A predictor: ``classifier(inputs, task_ids=None) -> (N, C)`` scores,
    for ``ForgettingCurves(predictor=...)``, the ``neurenix`` command and ``GridSearch``.

    A predictor rather than a forward hook on the model: ``model(x)`` stays the network's own
    output (the head's accuracy stays reportable beside the corrected one, and the teacher, the
    validation loss and other methods see the logits they train on), and the correction cannot
    leak into a copy of the model.
    """

    def __init__(self, bic: BiC) -> None:
        self.bic = bic

    def scores(self, inputs: Tensor, task_ids: Optional[Tensor] = None) -> Tensor:
        """``(N, C)`` corrected logits of ``inputs`` (the model in eval mode, no gradient)."""
        model = self.bic.model
        device = _first_device(model)
        with torch.no_grad(), evaluation_mode(model), hidden_forwards():
            arguments = model_arguments(model, inputs.to(device), None if task_ids is None else task_ids.to(device))
            logits = self.bic.corrected(model(*arguments))
        learned = self.bic._learned_classes()
        if learned is None or not bool(learned.any()):
            return logits
        mask = widened_mask(learned, logits.shape[1])[: logits.shape[1]].to(logits.device)
        return logits.masked_fill(~mask, float("-inf"))

    __call__ = scores

    def predict(self, inputs: Tensor, task_ids: Optional[Tensor] = None) -> Tensor:
        """The predicted class of each sample."""
        return self.scores(inputs, task_ids).argmax(1)


def _widened(values: Optional[Tensor], width: int, fill: float) -> Tensor:
    """``values`` (float64) extended to ``width`` with ``fill``."""
    if values is None:
        return torch.full((width,), fill, dtype=torch.float64)
    if values.numel() >= width:
        return values
    return torch.cat([values, torch.full((width - values.numel(),), fill, dtype=values.dtype, device=values.device)])


def _reindexed(labels: Tensor, columns: Tensor) -> Tensor:
    """Class labels as indices into the kept ``columns`` of a boolean mask."""
    position = torch.cumsum(columns.long(), 0) - 1
    return position[labels]


def _first_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _default_features(model: nn.Module, selection: str) -> nn.Module:
    """The second-to-last child of an ``nn.Sequential`` (the input of its last layer)."""
    if isinstance(model, nn.Sequential) and len(model) >= 2:
        return model[-2]
    raise ValueError(
        f"feature_extractor=None with selection={selection!r} needs an nn.Sequential model of two or more layers, got "
        f"{type(model).__name__}: name the submodule whose output are the features, e.g. "
        "BiC(model, feature_extractor=model.backbone) or feature_extractor='backbone', or use selection='random'"
    )

