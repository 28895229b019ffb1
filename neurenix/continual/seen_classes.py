"""Seen-class masking for class-incremental training: one head, scored over the classes seen so far.

Class-incremental reference code (Hsu et al. 2018; van de Ven & Tolias 2019) trains and predicts
with the single head restricted to the classes met so far: the logits of classes not yet seen
take no part in the softmax. :class:`SeenClassMask` does that as the model's last module, so
everything that reads the model's outputs sees the masked logits with no code of its own: the
task loss, EWC's Fisher, the teacher of :class:`~neurenix.continual.KnowledgeDistillation` (a
copy of the model, mask included, as it was at its task's end), replay's loss on remembered
samples.
"""

from __future__ import annotations

from numbers import Integral
from typing import Any, Iterable, Union

import torch
from torch import Tensor, nn

from neurenix.continual._checks import check_int, check_model

__all__ = ["SeenClassMask", "mark_seen_classes"]

Classes = Union[int, Tensor, Iterable[int]]


class SeenClassMask(nn.Module):
    """Set the logits of classes not seen yet to the dtype's lowest finite value.

    Put it at the end of a class-incremental model (``nn.Sequential(..., head,
    SeenClassMask(10))``) or call it on the logits in ``forward``. A masked unit's softmax
    probability is then exactly 0 and it gets no gradient, so cross-entropy over the masked
    logits equals cross-entropy over the seen classes' logits alone, in training and in
    evaluation alike. The lowest finite value rather than ``-inf``: a KL divergence between two
    masked distributions (distillation) stays finite where ``-inf - (-inf)`` would be NaN.

    Which classes are seen is the boolean buffer :attr:`seen`, part of the model's
    ``state_dict``: checkpoints, resumed runs and copies of the model (a distillation teacher)
    carry it. Under a :class:`~neurenix.data.TaskSequenceDataModule`, each task's classes are
    marked when its fit starts (:func:`mark_seen_classes`), after the previous task ended.
    Standalone (``train_step``), end the previous task first (``register_task`` of the new task
    id, or of the one just trained), then call :meth:`mark_seen` with the new task's classes,
    then train it: a task ends (and a distillation teacher is copied) at the next task's
    ``register_task`` or first ``train_step``, so classes marked before that would be in the
    teacher's mask too. A target of a class not marked gets a loss of about ``3e38`` (float32):
    mark first.

    Args:
        num_classes: the head's number of outputs, ``>= 1``.

    Raises:
        TypeError / ValueError: ``num_classes`` is not an int ``>= 1``.

    Example::

        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 10), SeenClassMask(10))
        mask = model[-1]
        for task_id, (loader, classes) in enumerate(tasks):
            distillation.register_task(task_id)  # ends the previous task: its teacher keeps its mask
            mask.mark_seen(classes)  # e.g. [2, 3]: the head now scores classes 0-3
            for inputs, targets in loader:
                distillation.train_step(optimizer, loss_fn, inputs, targets, task_id=task_id)
    """

    seen: Tensor

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = check_int("num_classes", num_classes, minimum=1)
        self.register_buffer("seen", torch.zeros(self.num_classes, dtype=torch.bool), persistent=True)

    def forward(self, logits: Tensor) -> Tensor:
        """``logits`` (``(..., num_classes)``) with the unseen classes' units at the lowest finite value.

        Raises:
            ValueError: the last dimension of ``logits`` is not ``num_classes``.
        """
        if logits.dim() == 0 or logits.shape[-1] != self.num_classes:
            raise ValueError(
                f"SeenClassMask({self.num_classes}) got logits of shape {tuple(logits.shape)}: their last dimension "
                f"must be the number of classes, {self.num_classes}"
            )
        # masked_fill's gradient is zero where it fills: the unseen units learn nothing.
        return logits.masked_fill(~self.seen, torch.finfo(logits.dtype).min)

    def mark_seen(self, classes: Classes) -> None:
        """Mark ``classes`` as seen: an int, integers, or a tensor of integer labels (any shape).

        Raises:
            TypeError: labels that are not integers (floating-point, complex or boolean).
            ValueError: a label outside ``[0, num_classes)`` (the message names it); nothing is
                marked then.
        """
        labels = _labels_tensor(classes)
        self._check_range(labels)
        self.seen[labels.to(self.seen.device)] = True

    def _check_range(self, labels: Tensor) -> None:
        if labels.numel() == 0:
            return
        for value in (int(labels.min()), int(labels.max())):
            if not 0 <= value < self.num_classes:
                raise ValueError(
                    f"mark_seen got class {value}, outside [0, {self.num_classes}) for SeenClassMask({self.num_classes})"
                )

    @property
    def seen_classes(self) -> list[int]:
        """The classes marked so far, sorted."""
        return torch.nonzero(self.seen).flatten().tolist()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, seen={self.seen_classes}"


def _labels_tensor(classes: Classes) -> Tensor:
    """``classes`` as a flat ``int64`` tensor, refused unless every item is an integer."""
    if isinstance(classes, Tensor):
        if classes.is_floating_point() or classes.is_complex() or classes.dtype == torch.bool:
            raise TypeError(f"mark_seen needs integer class labels, got a tensor of dtype {classes.dtype}")
        return classes.reshape(-1).long()
    items = [classes] if not isinstance(classes, Iterable) or isinstance(classes, (str, bytes)) else list(classes)
    for item in items:
        if isinstance(item, bool) or not isinstance(item, Integral):
            raise TypeError(f"mark_seen needs integer class labels, got {type(item).__name__}: {item!r}")
    return torch.tensor([int(item) for item in items], dtype=torch.long)


def mark_seen_classes(model: nn.Module, dataset: Any) -> list[SeenClassMask]:
    """Mark ``dataset``'s classes on every :class:`SeenClassMask` inside ``model``.

    The classes are the dataset's ``classes`` when they are integer labels (a
    :class:`~neurenix.data.TaskDataset`), else its ``targets`` (torchvision-style datasets, whose
    ``classes`` are names). A model without a mask is left alone and the dataset is not read.

    Args:
        model: the model (or the LightningModule holding it).
        dataset: the task's training data.

    Returns:
        The masks that were marked (empty when ``model`` has none).

    Raises:
        TypeError: ``model`` is not a module, or the dataset holds neither integer ``classes``
            nor ``targets`` (then call ``mask.mark_seen(classes)`` yourself).
        ValueError: a class outside a mask's ``[0, num_classes)``; no mask is marked then.
    """
    check_model(model)
    masks = [module for module in model.modules() if isinstance(module, SeenClassMask)]
    if not masks:
        return masks
    labels = _labels_tensor(_classes_of(dataset))
    for mask in masks:  # every mask checked before any is marked
        mask._check_range(labels)
    for mask in masks:
        mask.mark_seen(labels)
    return masks


def _classes_of(dataset: Any) -> Union[Tensor, list[int]]:
    classes = getattr(dataset, "classes", None)
    if classes is not None and all(isinstance(c, Integral) and not isinstance(c, bool) for c in classes):
        return list(classes)
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return torch.unique(torch.as_tensor(targets))
    raise TypeError(
        f"mark_seen_classes reads a dataset's classes from its integer `classes` or its `targets`; "
        f"{type(dataset).__name__} has neither: call mask.mark_seen(classes) on the model's SeenClassMask instead"
    )
