"""Synaptic Intelligence (Zenke, Poole & Ganguli, ICML 2017)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor
from typing_extensions import override

from neurenix.continual import functional as CF
from neurenix.continual._checks import check_model, check_real
from neurenix.continual.base import trainable_parameters
from neurenix.continual.path_integral import PathIntegral
from neurenix.continual.quadratic import QuadraticPenaltyMethod, snapshot

__all__ = ["SynapticIntelligence"]


class SynapticIntelligence(QuadraticPenaltyMethod):
    """Synaptic Intelligence: importance from each parameter's contribution to the loss decrease.

    During a task, every optimizer step adds ``ω += −g·Δθ``, ``g`` the gradient of the
    *unregularized* task loss and ``Δθ`` the step's actual parameter change. At the task's end
    ``Ω += relu(ω / ((θ_end − θ_start)² + xi))``, and later tasks pay
    ``importance · Σ Ω·(θ − θ*)²`` with ``θ*`` the parameters the last task ended with.

    The gradient is read where it is final (after ``backward``, before ``optimizer.step()``):
    ``update_importance(loss)`` in a plain loop, ``train_step``, or the Trainer's
    ``on_before_optimizer_step``, before any penalty (SI's own or another method's) is added.

    Args:
        model: the network whose parameters are protected.
        importance: ``c`` in the penalty, ``>= 0``.
        xi: damping ``ξ > = 0`` of the importance's denominator.
        device: where the state lives; ``None`` follows the model.

    Example::

        si = SynapticIntelligence(model, importance=1.0, xi=0.1)
        si.register_task(task_id=1)
        for inputs, targets in task1_loader:
            optimizer.zero_grad()
            loss = loss_fn(model(inputs), targets)
            loss.backward()
            si.update_importance(loss)
            optimizer.step()
        si.register_task(task_id=2)  # consolidates task 1
    """

    penalty_name = "SI penalty"

    def __init__(
        self,
        model: torch.nn.Module,
        importance: float = 1.0,
        xi: float = 0.1,
        device: Optional[torch.device] = None,
    ) -> None:
        check_model(model)
        self.importance = check_real("importance", importance, minimum=0.0)
        self.xi = check_real("xi", xi, minimum=0.0)
        super().__init__(model, device)
        #: The path integral of the task being trained (empty between tasks).
        self._path = PathIntegral()
        self._big_omega: dict[str, Tensor] = {}

    # Read by tests and tools that inspect the path integral's tensors.
    @property
    def _state(self) -> dict[str, dict[str, Tensor]]:
        return self._path.state

    @property
    def _pending_grads_storage(self) -> Optional[Tensor]:
        return self._path.pending_grads_storage

    def hyperparameters(self) -> dict[str, Any]:
        return {"importance": self.importance, "xi": self.xi}

    def _penalty_scale(self) -> float:
        return 2.0 * self.importance  # the penalty has no 1/2: c·ΣΩ(θ−θ*)² = (2c)/2·ΣΩ(θ−θ*)²

    # ---------------------------------------------------------------------------- the continual-learning API
    def register_task(self, task_id: int, dataloader: Any = None) -> None:
        """Register a task before training it (or after: it is consolidated then).

        ``dataloader`` is accepted so that code written for every method alike can pass one; SI
        needs no data.
        """
        super().register_task(task_id, dataloader)

    def update_importance(self, loss: Tensor) -> None:
        """Record this step for the path integral: call after ``loss.backward()``, before ``optimizer.step()``.

        Reads the gradients in ``.grad``, which must be those of the task ``loss`` without SI's
        penalty (with a ``GradScaler``: after ``scaler.unscale_(optimizer)``). The step's parameter
        change is taken at the next call (or when the task ends). Non-finite gradient entries
        count as zero: the scaler skips such a step, which then adds nothing to ``ω``.

        Raises:
            TypeError: ``loss`` is not a tensor.
            ValueError: ``loss`` is not a scalar, no task is registered, or no gradient exists.
        """
        if not isinstance(loss, Tensor):
            raise TypeError(f"loss must be a torch.Tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(f"loss must be a scalar, got a tensor of shape {tuple(loss.shape)}")
        if self.active_task is None:
            raise ValueError("update_importance: no task is being trained; call register_task(task_id) first")
        if all(p.grad is None for p in self._path.params):
            raise ValueError("update_importance found no gradients: call loss.backward() before it")
        self.prepare_for_device()
        self.observe_gradients()
        self.steps_in_active_task += 1

    def get_regularization_loss(self) -> Tensor:
        """``importance · Σ Ω·(θ − θ*)²``, differentiable; zero before the first task ends.

        A tensor to add to a loss in your own loop. To read it as a number use ``.item()`` (PyTorch warns on ``float()`` of a tensor that requires grad).
        """
        return self.penalty()

    # ---------------------------------------------------------------------------- path integral
    def _begin_task(self, task_id: int) -> None:
        self._path.begin(trainable_parameters(self.model), self.device)

    @override
    def observe_gradients(self) -> None:
        if self.active_task is None:
            return
        self._path.observe()

    def _consolidate(self, task_id: int, data: Any) -> None:
        self._path.flush()
        end = snapshot(dict(zip(self._path.names, self._path.params)), self.device)
        for name, theta_end in end.items():
            delta = theta_end - self._path.state["task_start"][name]
            contribution = CF.si_importance(self._path.state["omega"][name], delta, self.xi)
            previous = self._big_omega.get(name)
            self._big_omega[name] = contribution if previous is None else previous + contribution
        self._set_penalty(end, dict(self._big_omega), 0.0)
        self._path.clear()

    # ---------------------------------------------------------------------------- device & state
    @property
    def omega(self) -> dict[str, Tensor]:
        """A copy of the running path integral ``ω`` of the task being trained, by parameter name.

        Includes the last observed step, whose parameter change is taken up to now.
        """
        return self._path.current()

    @property
    def big_omega(self) -> dict[str, Tensor]:
        """A copy of the accumulated importance ``Ω`` of the finished tasks, by parameter name."""
        return {name: t.clone() for name, t in self._big_omega.items()}

    @override
    def prepare_for_device(self) -> None:
        super().prepare_for_device()
        self._path.to(self.device)

    def _move_state(self, device: torch.device) -> None:
        self._big_omega = {name: t.to(device) for name, t in self._big_omega.items()}
        self._set_penalty({n: t.to(device) for n, t in self._anchor.items()}, dict(self._big_omega), 0.0)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "anchor": dict(self._anchor),
            "big_omega": dict(self._big_omega),
            "task_state": self._path.state_dict(),
            "has_pending": self._path.has_pending,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        device = self.device
        self._big_omega = {n: t.to(device) for n, t in state_dict.get("big_omega", {}).items()}
        anchor = {n: t.to(device) for n, t in state_dict.get("anchor", {}).items()}
        self._set_penalty(anchor, dict(self._big_omega) if anchor else None, 0.0)
        self._path.load_state_dict(state_dict.get("task_state", {}), self.model, device, bool(state_dict.get("has_pending", False)))
        if self.active_task is not None and not self._path.active:
            # A checkpoint from before SI kept its path integral: restart it from here.
            self._begin_task(self.active_task)
