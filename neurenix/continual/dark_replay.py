"""Dark Experience Replay: DER and DER++ (Buzzega et al., NeurIPS 2020).

The memory keeps, beside each remembered sample, the logits the network gave it when it was
stored; a training step keeps the network's outputs on memory samples close to those logits
(DER) and, with ``beta > 0``, also trains on their labels (DER++).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from neurenix.continual import functional as CF
from neurenix.continual._checks import check_int, check_model, check_real
from neurenix.continual.base import model_arguments, running_statistics_kept, takes_task_ids
from neurenix.continual.callback import split_batch
from neurenix.continual.capture import CapturesTrainingForwards, ForwardCapture, hidden_forwards
from neurenix.continual.rehearsal import RehearsalMethod

__all__ = ["DarkExperienceReplay"]


class DarkExperienceReplay(CapturesTrainingForwards, RehearsalMethod):
    """Replay the network's own past logits: Dark Experience Replay, DER (``beta = 0``) or DER++ (``beta > 0``).

    Buzzega, Boschini, Porrello, Abati & Calderara, "Dark Experience for General Continual
    Learning: a Strong, Simple Baseline", *NeurIPS* 2020.

    The memory keeps ``memory_size`` samples by reservoir sampling over the whole stream (task
    free: every sample offered is kept with the same probability), each with its label, its task
    id and the logits ``z`` the network gave it when it was stored. A training step on a batch
    ``(x, y)`` of ``B`` samples back-propagates

    ``loss(f(x), y) + alpha · mean((f(x') − z')²) + beta · CE(f(x''), y'')``

    where ``(x', z')`` and ``(x'', y'')`` are two batches of ``r`` distinct samples drawn
    independently and uniformly from memory before the new batch is stored, the mean runs over
    the samples and the output units (``F.mse_loss``, as in the authors' code: the paper's squared
    norm over units is ``alpha`` absorbing the number of units), and
    ``r = max(1, round(replay_ratio · B))`` (0 when ``replay_ratio = 0``; fewer while the memory
    holds fewer). Each term is a mean over its memory batch, so even a batch of one sample keeps
    the term present (an unbiased estimate of it). The memory terms are skipped while the memory
    is empty, and the DER++ term is skipped (no second draw, no second forward) when ``beta = 0``:
    one class, ``beta`` the switch between DER and DER++. ``alpha`` and ``beta`` are the authors'
    ``--alpha`` and ``--beta`` exactly; their ``--minibatch_size`` is ``replay_ratio · B``.

    After the terms are computed, the new batch is offered to the memory with the logits of the
    step's own forward (detached, kept in float32, or float64 for a float64 model): the inputs
    stored are those the model was called with (after whatever ``training_step`` did to the
    batch), so that the stored logits are the model's outputs on exactly those inputs. The memory
    forwards run in the model's current mode, so batch-norm layers learn from memory samples as
    they do in the authors' code; a multi-head model gets each sample's stored task id.

    Args:
        model: the network being trained; its outputs are read as class logits (targets must be
            class labels: 1-D integer tensors).
        memory_size: samples kept, ``>= 0`` (0 turns the memory terms off).
        alpha: weight of the logit-matching term, ``>= 0``.
        beta: weight of the cross-entropy on a second memory batch, ``>= 0``; ``beta > 0`` is DER++.
        replay_ratio: memory samples per new sample in each memory batch, ``>= 0`` (1.0: a memory
            batch as large as the new batch, as in the paper).
        device: where the memory lives; ``None`` follows the model.
        seed: seeds the memory's sampling; ``None`` derives one from PyTorch's initial seed.
        selection: ``None``: the memory is a reservoir over the stream. ``"herding"``, ``"closest"``
            or ``"random"``: an exemplar memory chosen from each task's data at its end (as
            :class:`~neurenix.continual.ExperienceReplay`'s option: the stored logits are the network's outputs on the exemplars when the task ends); nothing enters it during a
            task, and ``add_to_memory`` is refused.
        feature_extractor: with ``"herding"`` or ``"closest"``, the submodule of ``model`` (or its
            name) whose output ranks the samples.

    In a plain loop, ``train_step`` stores each batch itself (its logits are those of the step):
    call ``add_to_memory`` only for samples that are not trained with ``train_step`` (its logits
    are the model's outputs then). A tensor just stored by one of the two is not stored again by
    the other (the loop of the Neurenix continual-learning API's replay tutorial calls both), with
    a warning.

    Under a Trainer the LightningModule needs :class:`~neurenix.continual.ContinualLossMixin`; the
    outputs are those of the last forward of ``model`` inside ``training_step``.

    Example::

        der = DarkExperienceReplay(model, memory_size=500, alpha=0.3, beta=0.5)  # DER++
        for inputs, targets in task2_loader:
            der.train_step(optimizer, loss_fn, inputs, targets, task_id=2)
    """

    needs_loss_mixin = True
    needs_class_labels = True

    def __init__(
        self,
        model: torch.nn.Module,
        memory_size: int = 1000,
        alpha: float = 0.2,
        beta: float = 0.0,
        replay_ratio: float = 1.0,
        device: Optional[torch.device] = None,
        *,
        seed: Optional[int] = None,
        selection: Optional[str] = None,
        feature_extractor: Union[None, torch.nn.Module, str] = None,
    ) -> None:
        check_model(model)
        check_int("memory_size", memory_size, minimum=0)
        self.alpha = check_real("alpha", alpha, minimum=0.0)
        self.beta = check_real("beta", beta, minimum=0.0)
        self.replay_ratio = check_real("replay_ratio", replay_ratio, minimum=0.0)
        super().__init__(model, memory_size, device, seed, selection=selection, feature_extractor=feature_extractor)
        self._capture = ForwardCapture(model)

    def hyperparameters(self) -> dict[str, Any]:
        selection = {} if self.selection is None else {"selection": self.selection}  # the default's state key as before
        return {"memory_size": self.memory_size, "alpha": self.alpha, "beta": self.beta, "replay_ratio": self.replay_ratio, **selection}

    def replay_count(self, batch_size: int) -> int:
        """Samples in each memory batch of a step on ``batch_size`` new ones:
        ``max(1, round(replay_ratio · batch_size))``, 0 when ``replay_ratio = 0``."""
        if self.replay_ratio == 0:
            return 0
        return max(1, round(self.replay_ratio * batch_size))

    @override
    def _extras_of(self, inputs: Tensor, task_ids: Tensor) -> dict[str, Tensor]:
        inputs = inputs.to(self.device)
        devices = [self.device] if self.device.type == "cuda" else []
        # Dropout draws from the global generators: forked, so the user's later draws stay as they were.
        with torch.no_grad(), running_statistics_kept(self.model), torch.random.fork_rng(devices=devices):
            outputs = self.model(*model_arguments(self.model, inputs, task_ids))
        return {"logits": _stored_logits(self._checked_outputs(outputs, inputs.shape[0]))}

    # ---------------------------------------------------------------------------- shared core
    @override
    def transform_loss(self, loss: Tensor, inputs: tuple[Tensor, ...], outputs: Any, targets: Tensor) -> Tensor:
        return self._with_memory_terms(loss, inputs, outputs, targets, None, store=self._claim_step_batch(inputs[0]))

    def _with_memory_terms(
        self,
        loss: Tensor,
        arguments: tuple[Tensor, ...],
        outputs: Any,
        targets: Tensor,
        batch_task_ids: Optional[Tensor],
        store: bool = True,
    ) -> Tensor:
        """``loss`` plus the memory terms (drawn first), then the batch stored with ``outputs``."""
        outputs = self._checked_outputs(outputs, targets.shape[0], arguments[0])
        count = self.replay_count(targets.shape[0])
        if count > 0 and len(self.memory) > 0:
            if self.alpha > 0:
                slots = self.memory.draw(count)
                matching = CF.logit_matching_loss(self._forward_memory(slots), self.memory.field("logits", slots))
                loss = loss + self.alpha * matching
            if self.beta > 0:
                slots = self.memory.draw(count)
                replayed = self._forward_memory(slots)
                # In float32 at least, as the matching term: a 16-bit cross-entropy loses the small terms.
                replayed = replayed.to(torch.promote_types(replayed.dtype, torch.float32))
                loss = loss + self.beta * F.cross_entropy(replayed, self.memory.field("targets", slots))
        if store:
            self._store_step(arguments, outputs, targets, batch_task_ids)
        return loss

    def _forward_memory(self, slots: Tensor) -> Tensor:
        """The model's outputs (with gradients) on the memory samples in ``slots``."""
        replayed = self.memory.take(slots)
        with hidden_forwards():
            return self.model(*model_arguments(self.model, replayed.inputs, replayed.task_ids))

    def _store_step(
        self, arguments: tuple[Tensor, ...], outputs: Tensor, targets: Tensor, batch_task_ids: Optional[Tensor]
    ) -> None:
        """Offer the step's samples to the memory: the model's inputs, the targets, the logits."""
        inputs = arguments[0]
        task_ids = batch_task_ids
        if len(arguments) == 2 and takes_task_ids(self.model) and _per_sample(arguments[1], inputs.shape[0]):
            task_ids = arguments[1]
        task_ids = self._task_ids_of(inputs, task_ids)
        self._remember(inputs.detach(), targets.detach(), task_ids, logits=_stored_logits(outputs))

    def _checked_outputs(self, outputs: Any, samples: int, inputs: Optional[Any] = None) -> Tensor:
        """``outputs`` if they are one row of logits per sample of the batch (and of ``inputs``)."""
        if not isinstance(outputs, Tensor) or outputs.dim() != 2:
            is_tensor = isinstance(outputs, Tensor)
            described = f"outputs of shape {tuple(outputs.shape)}" if is_tensor else f"a {type(outputs).__name__}"
            raise ValueError(
                f"DarkExperienceReplay stores the model's outputs as class logits, (samples, classes): the model "
                f"({type(self.model).__name__}) returned {described}"
            )
        given = inputs.shape[0] if isinstance(inputs, Tensor) and inputs.dim() > 0 else samples
        if outputs.shape[0] != samples or given != samples:
            raise ValueError(
                f"DarkExperienceReplay stores each sample with the model's outputs on it: the model's last forward "
                f"took {given} inputs and returned {outputs.shape[0]} rows of logits for a batch of {samples} targets"
            )
        return outputs

    # ---------------------------------------------------------------------------- Lightning side
    @override
    def transform_lightning_loss(self, loss: Tensor, batch: Any) -> Tensor:
        arguments, outputs = self._captured_step("the logits it stores")
        _, targets, task_ids = split_batch(batch)
        return self._with_memory_terms(loss, arguments, outputs, targets, task_ids)


def _stored_logits(outputs: Tensor) -> Tensor:
    """Logits as the memory keeps them: detached, in float32 at least (16-bit outputs cast up)."""
    return outputs.detach().to(torch.promote_types(outputs.dtype, torch.float32))


def _per_sample(value: Any, samples: int) -> bool:
    return isinstance(value, Tensor) and value.dim() == 1 and value.shape[0] == samples
