"""L2 regularization towards the previous task's parameters (the baseline of Kirkpatrick et al. 2017)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from neurenix.continual._checks import check_model, check_real
from neurenix.continual.base import trainable_parameters
from neurenix.continual.quadratic import QuadraticPenaltyMethod, snapshot

__all__ = ["L2Regularization"]


class L2Regularization(QuadraticPenaltyMethod):
    """A uniform quadratic pull towards the parameters the last task ended with.

    Training a later task adds ``importance/2 · Σ (θ − θ*)²``, ``θ*`` the parameters at the end of
    the most recent task (one anchor, as in the L2 baseline of Kirkpatrick et al. 2017 and Hsu et
    al. 2018). It is EWC with every Fisher value 1, and costs one copy of the parameters.

    Args:
        model: the network whose parameters are protected.
        importance: ``λ``, ``>= 0``.
        device: where the state lives; ``None`` follows the model.

    Example::

        l2 = L2Regularization(model, importance=1.0)
        ...train task 1...
        l2.register_task(task_id=1)          # anchors the parameters task 1 ended with
        for inputs, targets in task2_loader:
            l2.train_step(optimizer, loss_fn, inputs, targets, task_id=2)
    """

    penalty_name = "L2 penalty"

    def __init__(self, model: torch.nn.Module, importance: float = 1.0, device: Optional[torch.device] = None) -> None:
        check_model(model)
        self.importance = check_real("importance", importance, minimum=0.0)
        super().__init__(model, device)

    def hyperparameters(self) -> dict[str, Any]:
        return {"importance": self.importance}

    def _penalty_scale(self) -> float:
        return self.importance

    def register_task(self, task_id: int, dataloader: Any = None) -> None:
        """Register a task (before or after training it); its end-of-task parameters become the anchor.

        ``dataloader`` is accepted so that code written for every method alike can pass one; L2
        needs no data.
        """
        super().register_task(task_id, dataloader)

    def get_regularization_loss(self) -> Tensor:
        """``importance/2 · Σ (θ − θ*)²``, differentiable; zero before the first task ends.

        A tensor to add to a loss in your own loop. To read it as a number use ``.item()`` (PyTorch warns on ``float()`` of a tensor that requires grad).
        """
        return self.penalty()

    def _consolidate(self, task_id: int, data: Any) -> None:
        self._set_penalty(snapshot(trainable_parameters(self.model), self.device), None, 0.0)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "anchor": dict(self._anchor)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        device = self.device
        self._set_penalty({n: t.to(device) for n, t in state_dict.get("anchor", {}).items()}, None, 0.0)
