"""ER-ACE: experience replay with an asymmetric cross-entropy (Caccia et al., ICLR 2022)."""

from __future__ import annotations

from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from neurenix.continual import functional as CF
from neurenix.continual._checks import (
    check_batch,
    check_model,
    check_real,
    check_task_id,
)
from neurenix.continual.base import model_arguments, widened_mask
from neurenix.continual.callback import continual_methods, split_batch
from neurenix.continual.capture import CapturesTrainingForwards, ForwardCapture, hidden_forwards
from neurenix.continual.distillation import KnowledgeDistillation
from neurenix.continual.distributed import all_gather_objects, rank_and_world_size
from neurenix.continual.memory import ReplayBatch
from neurenix.continual.rehearsal import RehearsalMethod

__all__ = ["ERACE"]


class ERACE(CapturesTrainingForwards, RehearsalMethod):
    """Experience replay in which new classes cannot push the old ones around: the asymmetric
    cross-entropy (ACE) of Caccia et al., "New Insights on Reducing Abrupt Representation Change
    in Online Continual Learning", ICLR 2022.

    Each step's loss is the sum of two batch means,

    ``CE(incoming batch; softmax over the classes present in that batch)
    + CE(replayed batch; softmax over every class seen so far)``,

    the replayed batch being ``round(replay_ratio · B)`` distinct samples drawn uniformly from a
    reservoir memory of the stream (before the step's own batch is offered to it), run through
    the model in a forward of its own. Masking the absent classes out of the incoming term means
    that learning a new class never lowers the logits of the old ones: their units receive no
    gradient from new data, only from the replayed samples, which are scored over all classes.
    "Seen so far" is every label trained on or added to the memory, the current batch's included.
    While the memory is empty the loss is the masked incoming term alone.

    The incoming mask is always the classes present in the incoming mini-batch, as in the
    paper's formula. The authors' code (``pclucas14/AML``, ``methods/er_ace.py``) also leaves
    unmasked every unit from the largest label seen so far upwards (classes not met yet), and
    mammoth's port (``models/er_ace.py``) does the same and masks only from the second task on;
    both score the replayed batch over all output units. Here the replay term is taken over the
    seen classes, so units of classes never met are untouched by either term.

    Masked units hold their dtype's lowest finite value (``functional.masked_logits``): softmax
    0, gradient 0. The incoming term is the loss your code computes on the masked outputs, so
    that loss must be a plain cross-entropy (class weights are fine; label smoothing would put
    weight on the masked units). The replay term is a cross-entropy computed here, in float32 (or the logits' dtype if wider).

    In a plain loop, ``train_step`` draws the replayed batch, then offers its own batch to the
    memory; ``add_to_memory`` is for samples to remember without training on them (their labels
    count as seen). A tensor just stored by one of the two is not stored again by the other, with
    a warning (the loop of the Neurenix continual-learning API's replay tutorial calls both). Under a Trainer each training
    batch is offered to the memory right after the replayed samples are drawn, and the
    LightningModule needs :class:`~neurenix.continual.ContinualLossMixin`: the model's outputs
    inside ``training_step`` come back masked (a forward hook on ``model``), so the module's own
    loss is the incoming term, and the replay term is added to the loss it returns.

    Under DDP every process keeps its own memory of its own share of the stream and its own set
    of seen classes; DDP averages the gradients of the ranks' losses, each with its own replay
    term. Checkpoints hold every rank's memory and seen classes.

    Args:
        model: the network being trained; its outputs are read as class logits.
        memory_size: samples kept, ``>= 0`` (0 leaves the masked incoming term alone).
        replay_ratio: replayed samples per new sample, ``>= 0``.
        device: where the memory lives; ``None`` follows the model.
        seed: seeds the memory's sampling; ``None`` derives one from PyTorch's initial seed.
        selection: ``None``: the memory is a reservoir over the stream. ``"herding"``, ``"closest"``
            or ``"random"``: an exemplar memory chosen from each task's data at its end (as
            :class:`~neurenix.continual.ExperienceReplay`'s option); nothing enters it during a
            task (the first task trains without replay), and ``add_to_memory`` is refused.
        feature_extractor: with ``"herding"`` or ``"closest"``, the submodule of ``model`` (or its
            name) whose output ranks the samples.

    Raises:
        TypeError / ValueError: an argument of the wrong type or out of range.

    Example::

        ace = ERACE(model, memory_size=200, replay_ratio=1.0)
        for task_id, loader in enumerate(task_loaders):
            for inputs, targets in loader:
                ace.train_step(optimizer, torch.nn.CrossEntropyLoss(), inputs, targets, task_id)
    """

    needs_loss_mixin = True
    needs_class_labels = True

    def __init__(
        self,
        model: nn.Module,
        memory_size: int = 1000,
        replay_ratio: float = 1.0,
        device: Optional[torch.device] = None,
        *,
        seed: Optional[int] = None,
        selection: Optional[str] = None,
        feature_extractor: Union[None, nn.Module, str] = None,
    ) -> None:
        check_model(model)
        self.replay_ratio = check_real("replay_ratio", replay_ratio, minimum=0.0)
        super().__init__(model, memory_size, device, seed, selection=selection, feature_extractor=feature_extractor)
        #: Boolean mask over output units: the classes trained on or added to memory so far.
        self._seen: Optional[Tensor] = None
        #: Under a Trainer: the step's incoming targets and replayed samples, from
        #: extend_lightning_batch to the end of the step.
        self._incoming_targets: Optional[Tensor] = None
        self._replayed: Optional[ReplayBatch] = None
        self._capture = ForwardCapture(model, transform=self._mask_captured)

    def hyperparameters(self) -> dict[str, Any]:
        selection = {} if self.selection is None else {"selection": self.selection}  # the default's state key as before
        return {"memory_size": self.memory_size, "replay_ratio": self.replay_ratio, **selection}

    def replay_count(self, batch_size: int) -> int:
        """How many samples a step on ``batch_size`` new ones replays: ``round(replay_ratio · batch_size)``."""
        return round(self.replay_ratio * batch_size)

    @property
    def seen_classes(self) -> list[int]:
        """The labels trained on or added to the memory so far, ascending (reads the device)."""
        return [] if self._seen is None else torch.nonzero(self._seen).flatten().tolist()

    # ---------------------------------------------------------------------------- the continual-learning API
    def train_step(
        self,
        optimizer: torch.optim.Optimizer,
        loss_fn: Any,
        inputs: Tensor,
        targets: Tensor,
        task_id: int,
    ) -> Tensor:
        """One step on the asymmetric loss; the batch is then offered to the memory.

        ``loss_fn(outputs, targets)`` receives the outputs with the classes absent from
        ``targets`` masked out (it should be a cross-entropy); the replayed batch's cross-entropy
        over the seen classes is added to what it returns. Returns the summed loss (detached).
        The batch is then stored, unless ``add_to_memory`` has just stored this tensor (a warning).

        Raises:
            TypeError / ValueError: bad inputs, targets that are not class labels (a 1-D integer
                tensor), or a bad task_id; nothing is changed then.
        """
        return super().train_step(optimizer, loss_fn, inputs, targets, task_id)

    def add_to_memory(self, inputs: Tensor, targets: Tensor, task_id: int) -> None:
        """Offer samples to the memory without training on them; their labels count as seen.

        The tensor of inputs that the last ``train_step`` stored is not stored again (a warning).

        Raises:
            TypeError / ValueError: as :meth:`RehearsalMethod.add_to_memory`, and negative labels.
        """
        check_batch(inputs, targets)
        check_task_id(task_id)
        self.check_targets(targets)
        lowest, highest = (int(v) for v in torch.aminmax(targets)) if targets.numel() else (0, -1)  # not a step: may read
        if lowest < 0:
            raise ValueError(f"targets must be class labels >= 0, got a label of {lowest}")
        super().add_to_memory(inputs, targets, task_id)
        self._note_seen(targets.to(self.device), highest + 1)

    # ---------------------------------------------------------------------------- shared core
    @override
    def transform_outputs(self, arguments: tuple[Tensor, ...], outputs: Tensor, targets: Tensor) -> Tensor:
        return mask_absent_classes(outputs, targets)

    @override
    def transform_loss(self, loss: Tensor, inputs: tuple[Tensor, ...], outputs: Any, targets: Tensor) -> Tensor:
        store = self._claim_step_batch(inputs[0])
        replayed = self._draw_replay(targets.shape[0])
        loss = self._with_replay_term(loss, replayed, targets, outputs.shape[-1])
        if store:
            task_ids = inputs[1] if len(inputs) > 1 else None
            self._remember(inputs[0].detach(), targets.detach(), self._task_ids_of(inputs[0], task_ids))
        return loss

    def _draw_replay(self, batch_size: int) -> Optional[ReplayBatch]:
        """The step's replayed samples, drawn before the step's batch enters the memory."""
        count = self.replay_count(batch_size)
        if count == 0 or len(self.memory) == 0:
            return None
        return self.memory.sample(count)

    def _with_replay_term(self, loss: Tensor, replayed: Optional[ReplayBatch], targets: Tensor, width: int) -> Tensor:
        """``loss`` plus the replayed batch's cross-entropy over the classes seen so far."""
        self._note_seen(targets, width)
        if replayed is None:
            return loss
        device = targets.device
        arguments = model_arguments(self.model, replayed.inputs.to(device), replayed.task_ids.to(device))
        with hidden_forwards():  # scored over the seen classes: not the incoming batch's mask
            logits = self.model(*arguments)
        seen = self._seen[: logits.shape[-1]]
        # At least float32: the term is a mean of log-probabilities, which bf16/fp16 round coarsely.
        logits = CF.masked_logits(logits, seen)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        replay_loss = F.cross_entropy(logits, replayed.targets.to(device))
        return loss + replay_loss

    def _note_seen(self, targets: Tensor, width: int) -> None:
        """Mark ``targets`` as seen, the mask widened to ``width`` units (on the device: no sync)."""
        seen = widened_mask(self._seen, width, targets.device)
        if seen.device != targets.device:
            seen = seen.to(targets.device)
        self._seen = seen.index_fill_(0, targets.reshape(-1), True)

    @override
    def prepare_for_device(self) -> None:
        super().prepare_for_device()
        if self._seen is not None:
            self._seen = self._seen.to(self.device)

    # ---------------------------------------------------------------------------- Lightning side
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        distillation = [m for m in continual_methods(trainer) if isinstance(m, KnowledgeDistillation)]
        if stage == "fit" and distillation:
            raise ValueError(
                "ERACE and KnowledgeDistillation are on one Trainer: ERACE masks the outputs that the loss "
                "sees (the classes absent from each batch), so KnowledgeDistillation would distil masked "
                "logits. Use one of them; ERACE combines with EWC, L2Regularization and SynapticIntelligence"
            )

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._end_of_step()

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._end_of_step()
        super().on_train_end(trainer, pl_module)

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._end_of_step()
        super().on_exception(trainer, pl_module, exception)

    def _end_of_step(self) -> None:
        # Forwards after the step (another method's Fisher at the task's end) are left unmasked.
        self._incoming_targets = self._replayed = None
        self._capture.clear()

    @override
    def extend_lightning_batch(self, batch: Any) -> Any:
        inputs, targets, task_ids = split_batch(batch)
        self._incoming_targets = targets
        self._replayed = self._draw_replay(inputs.shape[0])
        self._remember(inputs.detach(), targets.detach(), self._task_ids_of(inputs, task_ids))
        return batch

    def _mask_captured(self, arguments: tuple[Tensor, ...], outputs: Tensor) -> Tensor:
        """The forward hook's transform: the step's forwards of the model come back masked."""
        if self._incoming_targets is None:
            return outputs
        return mask_absent_classes(outputs, self._incoming_targets)

    @override
    def transform_lightning_loss(self, loss: Tensor, batch: Any) -> Tensor:
        _, outputs = self._captured_step("the outputs it masks")
        targets, self._incoming_targets = self._incoming_targets, None
        replayed, self._replayed = self._replayed, None
        # The step's loss is formed: later forwards (other callbacks', a second manual step's) are
        # the model's own again.
        return self._with_replay_term(loss, replayed, targets, outputs.shape[-1])

    # ---------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "seen_classes": None if self._seen is None else self._seen.clone()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        per_rank = state_dict.get("seen_classes_per_rank")
        rank, world_size = rank_and_world_size()
        if per_rank is None:
            seen = state_dict.get("seen_classes")
        elif len(per_rank) == world_size:  # the same processes again: each gets its own back
            seen = per_rank[rank]
        else:  # the memories are pooled and dealt out again: so are the classes they hold
            seen = _union(per_rank)
        self._seen = None if seen is None else seen.to(device=self.device, dtype=torch.bool)

    @override
    def on_save_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if rank_and_world_size()[1] == 1:
            return
        # Each rank has seen the classes of its own share of the stream; rank 0 writes for all.
        seen = all_gather_objects(None if self._seen is None else self._seen.cpu())
        checkpoint["callbacks"][self.state_key]["seen_classes_per_rank"] = seen


def mask_absent_classes(outputs: Tensor, targets: Tensor) -> Tensor:
    """``outputs`` with the units of classes absent from ``targets`` masked out (ACE's incoming term)."""
    return CF.masked_logits(outputs, CF.present_classes_mask(targets.reshape(-1).to(outputs.device), outputs.shape[-1]))


def _union(masks: list[Optional[Tensor]]) -> Optional[Tensor]:
    """The classes any of ``masks`` marks (``None`` where none marks any)."""
    union: Optional[Tensor] = None
    for mask in masks:
        if mask is not None:
            union = widened_mask(union, mask.numel()).clone()
            union[: mask.numel()] |= mask.to(torch.bool)
    return union
