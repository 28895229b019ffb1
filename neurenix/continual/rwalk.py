"""Riemannian Walk (Chaudhry, Dokania, Ajanthan & Torr, ECCV 2018)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor
from typing_extensions import override

from neurenix.continual import functional as CF
from neurenix.continual._checks import check_int, check_model, check_real
from neurenix.continual.base import trainable_parameters
from neurenix.continual.path_integral import PathIntegral
from neurenix.continual.quadratic import QuadraticPenaltyMethod, snapshot

__all__ = ["RWalk"]


class RWalk(QuadraticPenaltyMethod):
    """Riemannian Walk: EWC++'s online Fisher plus path scores measured in distribution space.

    Every optimizer step, with ``g`` the gradient of the *unregularized* loss:

    - the online Fisher (EWC++, the paper's Eq. 6) ``F ← α·g² + (1 − α)·F``, kept across tasks
      (from zero; ``g`` is the step's mini-batch gradient, as the authors' code takes it, not
      per-sample gradients);
    - SI's path integral ``ω += −g·Δθ``.

    Every ``interval`` steps (and at the task's end) the interval's score
    ``relu(ω / (½·F·Δ² + ε))`` is added to the task's score (Eq. 7: ``Δ`` the parameter's change over
    the interval, ``½·F·Δ²`` the KL divergence it caused), and ``ω`` restarts. At the task's end
    the scores are averaged with the previous tasks', ``s ← ½(s + s_t)`` (Eq. 8; the first task's
    taken as is), and later tasks pay ``importance · Σ (F̂ + ŝ)·(θ − θ*)²`` (Eq. 9, no ½), ``θ*``
    the parameters the last task ended with and ``F̂ = F / max F``, ``ŝ = s / max s`` scaled into
    ``[0, 1]`` over all parameters, as the paper does so that neither term dominates.

    Gradients are read where they are final (``train_step``, or the Trainer's
    ``on_before_optimizer_step``: accumulated, all-reduced under DDP, unscaled), before any
    penalty is added. Entries of a non-finite gradient (a step the gradient scaler skips) add
    nothing to ``F`` or ``ω``.

    Args:
        model: the network whose parameters are protected.
        importance: ``λ`` in the penalty, ``>= 0``.
        alpha: the online Fisher's weight of the new step, in ``[0, 1]`` (the paper's ``α``).
        epsilon: ``ε > 0`` in the score's denominator (the authors' code: 1e-3).
        device: where the state lives; ``None`` follows the model.
        interval: optimizer steps per score interval, ``>= 1`` (the paper's ``Δt``; Avalanche: 10).

    Example::

        rwalk = RWalk(model, importance=1.0)
        for inputs, targets in task1_loader:
            rwalk.train_step(optimizer, loss_fn, inputs, targets, task_id=1)
        for inputs, targets in task2_loader:  # a new task_id consolidates task 1
            rwalk.train_step(optimizer, loss_fn, inputs, targets, task_id=2)
    """

    penalty_name = "RWalk penalty"

    def __init__(
        self,
        model: torch.nn.Module,
        importance: float = 1.0,
        alpha: float = 0.9,
        epsilon: float = 1e-3,
        device: Optional[torch.device] = None,
        *,
        interval: int = 10,
    ) -> None:
        check_model(model)
        self.importance = check_real("importance", importance, minimum=0.0)
        self.alpha = check_real("alpha", alpha, minimum=0.0, maximum=1.0)
        self.epsilon = check_real("epsilon", epsilon, minimum=0.0, strict_minimum=True)
        self.interval = check_int("interval", interval, minimum=1)
        super().__init__(model, device)
        #: The path integral of the score interval being trained (empty between tasks).
        self._path = PathIntegral()
        self._interval_steps = 0
        #: The online Fisher (kept across tasks), the task's summed interval scores and the
        #: tasks' averaged score, by parameter name, in at least float32.
        self._fisher: dict[str, Tensor] = {}
        self._task_score: dict[str, Tensor] = {}
        self._score: dict[str, Tensor] = {}
        self._fishers: list[Tensor] = []  # _fisher in the order of _path.params (no dict per step)

    def hyperparameters(self) -> dict[str, Any]:
        return {"importance": self.importance, "alpha": self.alpha, "epsilon": self.epsilon, "interval": self.interval}

    def _penalty_scale(self) -> float:
        return 2.0 * self.importance  # the penalty has no 1/2: λ·ΣW(θ−θ*)² = (2λ)/2·ΣW(θ−θ*)²

    # ---------------------------------------------------------------------------- the continual-learning API
    def register_task(self, task_id: int, dataloader: Any = None) -> None:
        """Register a task (before or after training it).

        ``dataloader`` is accepted so that code written for every method alike can pass one;
        RWalk needs no data (its Fisher and scores come from the training steps).
        """
        super().register_task(task_id, dataloader)

    def get_regularization_loss(self) -> Tensor:
        """``importance · Σ (F̂ + ŝ)·(θ − θ*)²``, differentiable; zero before the first task ends."""
        return self.penalty()

    @property
    def fisher(self) -> dict[str, Tensor]:
        """A copy of the online Fisher ``F``, by parameter name."""
        return {name: t.clone() for name, t in self._fisher.items()}

    @property
    def scores(self) -> dict[str, Tensor]:
        """A copy of the score ``s`` averaged over the finished tasks, by parameter name."""
        return {name: t.clone() for name, t in self._score.items()}

    @property
    def task_scores(self) -> dict[str, Tensor]:
        """A copy of the task being trained's summed scores of its closed intervals, by parameter name."""
        return {name: t.clone() for name, t in self._task_score.items()}

    # ---------------------------------------------------------------------------- training steps
    def _begin_task(self, task_id: int) -> None:
        params = trainable_parameters(self.model)
        self._path.begin(params, self.device)
        self._interval_steps = 0
        self._task_score = {name: torch.zeros_like(t) for name, t in self._path.state["omega"].items()}
        for name, start in self._path.state["task_start"].items():
            if name not in self._fisher:
                self._fisher[name] = torch.zeros_like(start)
        self._bind_fisher()

    def _bind_fisher(self) -> None:
        self._fishers = [self._fisher[name] for name in self._path.names] if self._path.active else []

    @override
    def observe_gradients(self) -> None:
        if self.active_task is None or not self._path.params:
            return
        if self._interval_steps >= self.interval:
            self._close_interval()
        self._path.observe()
        CF.rwalk_fisher_update_(self._fishers, [p.grad for p in self._path.params], self.alpha)
        self._interval_steps += 1

    def _close_interval(self) -> None:
        """Add the interval's score to the task's, and start the next interval here."""
        self._path.flush()
        omega, change = self._path.state["omega"], self._path.change()
        for name, score in self._task_score.items():
            score += CF.rwalk_interval_score(omega[name], change[name], self._fisher[name], self.epsilon)
        self._path.restart()
        self._interval_steps = 0

    def _consolidate(self, task_id: int, data: Any) -> None:
        if self._interval_steps > 0:
            self._close_interval()
        for name, new in self._task_score.items():
            self._score[name] = CF.rwalk_average_scores(self._score.get(name), new)
        anchor = snapshot(dict(zip(self._path.names, self._path.params)), self.device)
        scores = {name: self._score[name] for name in anchor}
        self._set_penalty(anchor, CF.rwalk_weights({name: self._fisher[name] for name in anchor}, scores), 0.0)
        self._path.clear()
        self._task_score = {}
        self._bind_fisher()

    # ---------------------------------------------------------------------------- device & state
    @override
    def prepare_for_device(self) -> None:
        super().prepare_for_device()
        device = self.device
        if self._fisher and next(iter(self._fisher.values())).device != device:
            self._fisher = {n: t.to(device) for n, t in self._fisher.items()}
            self._task_score = {n: t.to(device) for n, t in self._task_score.items()}
            self._score = {n: t.to(device) for n, t in self._score.items()}
        self._path.to(device)
        self._bind_fisher()

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "anchor": dict(self._anchor),
            "weight": dict(self._weight or {}),
            "fisher": dict(self._fisher),
            "score": dict(self._score),
            "task_score": dict(self._task_score),
            "interval_state": self._path.state_dict(),
            "has_pending": self._path.has_pending,
            "interval_steps": self._interval_steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        device = self.device

        def on_device(key: str) -> dict[str, Tensor]:
            return {n: t.to(device) for n, t in state_dict.get(key, {}).items()}

        anchor = on_device("anchor")
        self._set_penalty(anchor, on_device("weight") if anchor else None, 0.0)
        self._fisher, self._score, self._task_score = on_device("fisher"), on_device("score"), on_device("task_score")
        self._path.load_state_dict(state_dict.get("interval_state", {}), self.model, device, bool(state_dict.get("has_pending", False)))
        self._interval_steps = int(state_dict.get("interval_steps", 0))
        self._bind_fisher()
        if self.active_task is not None and not self._path.active:
            # A state without the running interval (saved between tasks' keys only): restart it here.
            self._begin_task(self.active_task)

