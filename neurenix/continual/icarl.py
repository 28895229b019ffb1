"""iCaRL: incremental classifier and representation learning (Rebuffi et al., CVPR 2017).

A class-incremental method in three parts: a representation trained with a sigmoid (binary
cross-entropy) loss whose targets for the classes learned before are the previous network's own
outputs (distillation), a memory of exemplars per class chosen by herding at each task's end, and
a nearest-mean-of-exemplars classifier (NCM) that predicts from the exemplars' class means.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor, nn
from typing_extensions import override

from neurenix.continual import functional as CF
from neurenix.continual.base import uncompiled
from neurenix.continual.distilled_exemplars import DistilledExemplars
from neurenix.continual.exemplars import FeatureExtractor, NearestMeanClassifier

__all__ = ["ICaRL"]


class ICaRL(DistilledExemplars):
    """iCaRL: a sigmoid classifier distilled from its previous self, herded exemplars, and NCM.

    Rebuffi, Kolesnikov, Sperl & Lampert, "iCaRL: Incremental Classifier and Representation
    Learning", *CVPR* 2017.

    **Training** (the paper's Alg. 3, UpdateRepresentation). Every step trains on the new batch
    plus ``round(replay_ratio · B)`` exemplars drawn uniformly from the memory (appended to the
    batch, as :class:`~neurenix.continual.ExperienceReplay` does; the paper shuffles the union of
    the new data and the exemplars instead, where exemplars are ``|M| / (|M| + |D|)`` of every
    batch: ``replay_ratio = |M| / |D|`` gives that share). The loss back-propagated is iCaRL's,

    ``−mean_{i,y} [q_iy log σ(z_iy) + (1 − q_iy) log(1 − σ(z_iy))]``

    over the extended batch and every output unit (:func:`~neurenix.continual.functional.icarl_loss`),
    where ``q_iy`` is the one-hot label for a class not learned in an earlier task and, for a class
    that was, ``σ(z_old,iy)``: the output of the network frozen at the end of the previous task
    (the teacher: eval mode, no gradient) on the same sample. It *replaces* the loss the user's
    ``loss_fn`` (or ``training_step``) computes: iCaRL's classifier is sigmoid, not softmax.

    **At each task's end** (Alg. 2): the teacher is snapshotted; the memory's budget is re-split
    evenly over the classes seen (``floor``/``ceil`` of ``memory_size / classes``), each old class
    keeps the first exemplars of its herding order (ReduceExemplarSet), and each class of the
    task's data gets its exemplars chosen from that data by herding on L2-normalized features
    (ConstructExemplarSet; :func:`~neurenix.continual.exemplars.select_exemplars`); then the class
    means of the exemplars' normalized features are computed for NCM.

    **Prediction.** :attr:`classifier` (a :class:`~neurenix.continual.exemplars.NearestMeanClassifier`)
    scores ``−‖φ(x)/‖φ(x)‖ − μ_y‖²``; its arg max is iCaRL's prediction. The network's own outputs
    stay available (``model(x)``): the head's accuracy and NCM's can be reported side by side,
    e.g. ``ForgettingCurves(..., predictor=icarl.classifier)``. The means are those of the last
    finished task: they are recomputed at each task's end, not during training.

    Args:
        model: the network being trained; its outputs are read as one logit per class (targets
            are class labels, 1-D integer tensors, below the number of output units).
        memory_size: exemplars kept in all, ``>= 0`` (0: no exemplars, no NCM; the distilled
            sigmoid loss alone).
        feature_extractor: where the features ``φ(x)`` come from: a submodule of ``model`` (its
            output, flattened) or its name in ``model.named_modules()``; ``None`` for an
            ``nn.Sequential`` model takes the output of its second-to-last child (the input of
            its last layer).
        replay_ratio: exemplars appended per new sample in each step, ``>= 0``.
        device: where the memory and the teacher live; ``None`` follows the model.
        seed: seeds the memory's draws; ``None`` derives one from PyTorch's initial seed.
        selection: how exemplars are chosen: ``"herding"`` (the paper), ``"random"`` or
            ``"closest"`` (nearest to the class mean first).

    Under a Trainer the LightningModule needs :class:`~neurenix.continual.ContinualLossMixin`;
    the outputs are those of the last forward of ``model`` inside ``training_step``, and the
    exemplars are chosen from the fit's training data at its end. Under DDP each rank chooses
    from its own shard and keeps its own memory (``memory_size`` each; all of them in the
    checkpoint), and the class means are summed over every rank's exemplars.

    In a plain loop, give each task's data to :meth:`register_task` (before or after training
    it): that is where the exemplars are chosen. ``train_step`` stores nothing, and
    ``add_to_memory`` is refused (exemplars come from a whole task's data, not from batches).

    Example::

        icarl = ICaRL(model, memory_size=2000, feature_extractor=model[0])
        for task_id, loader in enumerate(task_loaders):
            for inputs, targets in loader:
                icarl.train_step(optimizer, loss_fn, inputs, targets, task_id=task_id)
            icarl.register_task(task_id, loader)  # exemplars by herding, class means
        predictions = icarl.classifier.predict(test_inputs)
    """

    method_name = "ICaRL"
    paper_name = "iCaRL"
    own_distillation = "its sigmoid targets for the old classes"

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
    ) -> None:
        super().__init__(model, memory_size, feature_extractor, replay_ratio, device, seed, selection)
        assert self._extractor is not None  # set with selection
        #: The features ``φ`` that exemplars are chosen by and NCM classifies by.
        self.features: FeatureExtractor = self._extractor
        self.classifier = NearestMeanClassifier(model, self.features, self.memory)

    @override
    def _default_features(self, model: nn.Module, selection: str) -> nn.Module:
        return _default_features(uncompiled(model))  # NCM needs features whatever the selection

    # ---------------------------------------------------------------------------- the continual-learning API
    def register_task(self, task_id: int, dataloader: Any = None) -> None:
        """Register a task; once it has been trained, its exemplars are chosen from ``dataloader``.

        Called after the task's training (or before it: the data is kept until the task ends),
        the task is consolidated now: the teacher is snapshotted, the exemplars of its classes
        chosen from ``dataloader`` (batches ``(inputs, targets)``) and the class means updated.

        Raises:
            ValueError: as the base class, or a trained task ends with no data to choose its
                exemplars from (nothing is changed then).
        """
        super().register_task(task_id, dataloader)

    # ---------------------------------------------------------------------------- shared core
    @override
    def _method_loss(self, inputs: Union[Tensor, tuple[Tensor, ...]], outputs: Tensor, targets: Tensor) -> Tensor:
        return self.icarl_loss(inputs, outputs, targets)

    def icarl_loss(self, inputs: Union[Tensor, tuple[Tensor, ...]], outputs: Tensor, targets: Tensor) -> Tensor:
        """iCaRL's loss on a batch (see the class): ``outputs`` the model's on ``inputs`` (a tensor,
        or the tuple of its arguments), the teacher's sigmoid as the old classes' targets.

        Raises:
            ValueError: ``outputs`` not one row of logits per target.
        """
        teacher = self._read_step(inputs, outputs, targets)
        if teacher is None:
            return CF.icarl_loss(outputs, targets)
        old_logits, old_classes = teacher
        return CF.icarl_loss(outputs, targets, old_logits, old_classes)

    # ---------------------------------------------------------------------------- the task's end
    @override
    def _consolidate(self, task_id: int, data: Any) -> None:
        super()._consolidate(task_id, data)  # the exemplars, then the teacher
        if self.memory_size > 0:  # a collective under DDP: every rank has the same memory_size
            self.classifier.update_means(self._convert_inputs)

    # ---------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "classifier": self.classifier.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        classifier = state_dict.get("classifier")
        if classifier is not None:
            self.classifier.load_state_dict(classifier)


def _default_features(model: nn.Module) -> nn.Module:
    """The second-to-last child of an ``nn.Sequential`` (the input of its last layer)."""
    if isinstance(model, nn.Sequential) and len(model) >= 2:
        return model[-2]
    raise ValueError(
        f"feature_extractor=None needs an nn.Sequential model of two or more layers, got {type(model).__name__}: "
        "name the submodule whose output are the features, e.g. ICaRL(model, feature_extractor=model.backbone) "
        "or feature_extractor='backbone'"
    )

