"""Synaptic Intelligence (Zenke, Poole & Ganguli, ICML 2017)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor
from typing_extensions import override

from neurenix.continual import functional as CF
from neurenix.continual._checks import check_model, check_real
from neurenix.continual.base import trainable_parameters
from neurenix.continual.quadratic import QuadraticPenaltyMethod, accumulation_dtype, snapshot

__all__ = ["SynapticIntelligence"]

_TRACKED = ("omega", "task_start", "pending_grad", "pending_params")


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
        self._names: list[str] = []
        self._params: list[torch.nn.Parameter] = []
        #: Per-task path-integral state, by name; ``pending_*`` hold the gradient and the
        #: parameters of the last observed step, whose Δθ is known only after it is taken.
        self._state: dict[str, dict[str, Tensor]] = {}
        #: ``_state``'s tensors as lists in the order of ``_params`` (made once per task, so that
        #: a training step builds nothing).
        self._omegas: list[Tensor] = []
        self._pending_grads: list[Tensor] = []
        self._pending_params: list[Tensor] = []
        self._pending_grads_storage: Optional[Tensor] = None
        self._set_path_state({key: {} for key in _TRACKED})
        self._has_pending = False
        self._big_omega: dict[str, Tensor] = {}

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
        if all(p.grad is None for p in self._params):
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
        params = trainable_parameters(self.model)
        self._names, self._params = list(params), list(params.values())
        start = snapshot(params, self.device)
        self._set_path_state({
            "omega": {name: torch.zeros_like(s) for name, s in start.items()},
            "task_start": start,
            "pending_grad": {name: torch.zeros_like(s) for name, s in start.items()},
            "pending_params": {name: torch.zeros_like(s) for name, s in start.items()},
        })
        self._has_pending = False

    def _set_path_state(self, state: dict[str, dict[str, Tensor]]) -> None:
        # The path integral and the parameters it subtracts are kept in at least float32: in a
        # 16-bit model's precision, ω would stop taking up steps much smaller than itself.
        for key in ("omega", "task_start", "pending_params"):
            state[key] = {name: t.to(accumulation_dtype(t.dtype)) for name, t in state[key].items()}
        # The pending gradients share one buffer, so that one kernel clears their non-finite
        # entries on a GPU (see CF.si_step_).
        self._pending_grads_storage, state["pending_grad"] = CF.packed(state["pending_grad"])
        self._state = state
        names = self._names if state["task_start"] else []  # empty between tasks
        self._omegas = [state["omega"][name] for name in names]
        self._pending_grads = [state["pending_grad"][name] for name in names]
        self._pending_params = [state["pending_params"][name] for name in names]

    @override
    def observe_gradients(self) -> None:
        if self.active_task is None or not self._params:
            return
        params = self._params
        grads = [p.grad for p in params]
        CF.si_step_(self._omegas, self._pending_grads, self._pending_params, grads, params, self._has_pending, self._pending_grads_storage)
        self._has_pending = True

    def _flush_pending_step(self) -> None:
        if self._has_pending:
            CF.si_accumulate_(self._omegas, self._pending_grads, self._pending_params, self._params)
            self._has_pending = False

    def _consolidate(self, task_id: int, data: Any) -> None:
        self._flush_pending_step()
        end = snapshot(dict(zip(self._names, self._params)), self.device)
        for name, theta_end in end.items():
            delta = theta_end - self._state["task_start"][name]
            contribution = CF.si_importance(self._state["omega"][name], delta, self.xi)
            previous = self._big_omega.get(name)
            self._big_omega[name] = contribution if previous is None else previous + contribution
        self._set_penalty(end, dict(self._big_omega), 0.0)
        self._set_path_state({key: {} for key in _TRACKED})

    # ---------------------------------------------------------------------------- device & state
    @property
    def omega(self) -> dict[str, Tensor]:
        """A copy of the running path integral ``ω`` of the task being trained, by parameter name.

        Includes the last observed step, whose parameter change is taken up to now.
        """
        omega = {name: t.clone() for name, t in self._state["omega"].items()}
        if self._has_pending:
            before = [t.clone() for t in self._state["pending_params"].values()]
            CF.si_accumulate_(omega.values(), self._state["pending_grad"].values(), before, self._params)
        return omega

    @property
    def big_omega(self) -> dict[str, Tensor]:
        """A copy of the accumulated importance ``Ω`` of the finished tasks, by parameter name."""
        return {name: t.clone() for name, t in self._big_omega.items()}

    @override
    def prepare_for_device(self) -> None:
        super().prepare_for_device()
        device = self.device
        start = self._state["task_start"]
        if start and next(iter(start.values())).device != device:
            self._set_path_state({key: {n: t.to(device) for n, t in values.items()} for key, values in self._state.items()})

    def _move_state(self, device: torch.device) -> None:
        self._big_omega = {name: t.to(device) for name, t in self._big_omega.items()}
        self._set_penalty({n: t.to(device) for n, t in self._anchor.items()}, dict(self._big_omega), 0.0)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "anchor": dict(self._anchor),
            "big_omega": dict(self._big_omega),
            "task_state": {key: dict(values) for key, values in self._state.items()},
            "has_pending": self._has_pending,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        device = self.device
        self._big_omega = {n: t.to(device) for n, t in state_dict.get("big_omega", {}).items()}
        anchor = {n: t.to(device) for n, t in state_dict.get("anchor", {}).items()}
        self._set_penalty(anchor, dict(self._big_omega) if anchor else None, 0.0)
        task_state = state_dict.get("task_state", {})
        state = {key: {n: t.to(device) for n, t in task_state.get(key, {}).items()} for key in _TRACKED}
        params = dict(self.model.named_parameters())
        self._names = list(state["task_start"])
        self._params = [params[name] for name in self._names]
        self._set_path_state(state)
        self._has_pending = bool(state_dict.get("has_pending", False))
        if self.active_task is not None and not self._state["task_start"]:
            # A checkpoint from before SI kept its path integral: restart it from here.
            self._begin_task(self.active_task)
