"""Memory Aware Synapses (Aljundi, Babiloni, Elhoseiny, Rohrbach & Tuytelaars, ECCV 2018)."""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import Tensor

from neurenix.continual import functional as CF
from neurenix.continual._checks import check_int, check_model, check_real
from neurenix.continual.base import default_seed, trainable_parameters
from neurenix.continual.quadratic import QuadraticPenaltyMethod, accumulation_dtype, snapshot
from neurenix.continual.sample_gradients import PerSampleGradients, readable_task_batch, task_gradient_mean

__all__ = ["MAS"]


class MAS(QuadraticPenaltyMethod):
    """Memory Aware Synapses: a quadratic pull weighted by how much each parameter moves the outputs.

    At the end of each task, each parameter's importance is the mean over ``sample_size`` of the
    task's samples of ``|∂‖f(x)‖²₂/∂θ|``, ``f(x)`` the model's outputs (each sample's own gradient,
    as the paper's Eq. 4: in closed form for networks of ``nn.Linear`` layers, else with
    ``torch.func.vmap``). No labels are needed. The importances of the tasks add up,
    ``Ω ← Ω + Ω_t``, and later tasks pay ``importance · Σ Ω·(θ − θ*)²`` (no ½, as the paper's Eq. 3),
    ``θ*`` the parameters the last task ended with: the accumulation of the authors' code and of
    Hsu et al. 2018's.

    Args:
        model: the network whose parameters are protected (for a Lightning run: the
            LightningModule or a submodule of it). Its outputs are what ``‖f(x)‖²`` is taken of (a
            multi-head model: the task's head, called with the task ids).
        importance: ``λ`` in the penalty, ``>= 0``.
        sample_size: samples per task for the importance, ``> 0`` (all of them if the task has
            fewer); drawn at random (``seed``) from a map-style dataset.
        device: where the state lives; ``None`` follows the model.
        seed: seeds the sampling of the importance's data; ``None`` derives one from PyTorch's
            initial seed (so ``seed_everything`` makes runs repeatable). PyTorch's global
            generator is left as it was.

    Raises:
        TypeError / ValueError: an argument outside its range (named in the message).

    Example::

        mas = MAS(model, importance=1.0)
        mas.register_task(task_id=1, dataloader=task1_loader)
        for inputs, targets in task1_loader:
            mas.train_step(optimizer, loss_fn, inputs, targets, task_id=1)
        mas.register_task(task_id=2, dataloader=task2_loader)  # consolidates task 1
    """

    penalty_name = "MAS penalty"

    def __init__(
        self,
        model: torch.nn.Module,
        importance: float = 1.0,
        sample_size: int = 1000,
        device: Optional[torch.device] = None,
        *,
        seed: Optional[int] = None,
    ) -> None:
        check_model(model)
        self.importance = check_real("importance", importance, minimum=0.0)
        self.sample_size = check_int("sample_size", sample_size, minimum=1)
        seed = default_seed("MAS") if seed is None else check_int("seed", seed, minimum=0)
        super().__init__(model, device)
        self._generator = torch.Generator().manual_seed(seed)
        #: ``Ω``: the importances of the finished tasks, summed, by parameter name.
        self._omega: dict[str, Tensor] = {}

    def hyperparameters(self) -> dict[str, Any]:
        return {"importance": self.importance, "sample_size": self.sample_size}

    def _penalty_scale(self) -> float:
        return 2.0 * self.importance  # the penalty has no 1/2: λ·ΣΩ(θ−θ*)² = (2λ)/2·ΣΩ(θ−θ*)²

    # ---------------------------------------------------------------------------- the continual-learning API
    def register_task(self, task_id: int, dataloader: Any = None) -> None:
        """Register a task (before or after training it); ``dataloader`` is the data its importance is computed from.

        In a Lightning fit the fit's training batches serve when no ``dataloader`` was given.
        """
        super().register_task(task_id, dataloader)

    def get_regularization_loss(self) -> Tensor:
        """``importance · Σ Ω·(θ − θ*)²``, differentiable; zero before the first task ends.

        A tensor to add to a loss in your own loop. To read it as a number use ``.item()``.
        """
        return self.penalty()

    @property
    def omega(self) -> dict[str, Tensor]:
        """A copy of the accumulated importance ``Ω`` of the finished tasks, by parameter name."""
        return {name: t.clone() for name, t in self._omega.items()}

    def check_task_batch(self, batch: Any) -> None:
        """At a fit's first batch: the importance will read the fit's batches at the task's end; can it?"""
        if self._task_data is None:
            readable_task_batch(self, batch, "importance")

    # ---------------------------------------------------------------------------- consolidation
    def _consolidate(self, task_id: int, data: Any) -> None:
        anchor = snapshot(trainable_parameters(self.model), self.device)
        if data is None:
            warnings.warn(
                f"MAS consolidated task {task_id} without data: it adds no importance (give the task's data "
                f"with register_task({task_id}, dataloader) before its end)",
                stacklevel=3,
            )
            new = {name: torch.zeros_like(a, dtype=accumulation_dtype(a.dtype)) for name, a in anchor.items()}
        else:
            new = self._estimate_importance(anchor, data, task_id)
        self._omega = {name: self._omega[name] + o if name in self._omega else o for name, o in new.items()}
        self._set_penalty(anchor, dict(self._omega), 0.0)

    def _estimate_importance(self, at: dict[str, Tensor], data: Any, task_id: int) -> dict[str, Tensor]:
        """``mean_n |∂‖f(x_n)‖²/∂θ|`` at ``at`` over up to ``sample_size`` samples of ``data``."""
        gradients = PerSampleGradients(self.model, at, power=1)

        def batch_sums(others: dict[str, Tensor], inputs: tuple[Tensor, ...], targets: Tensor) -> tuple[dict[str, Tensor], int]:
            return gradients.sums(others, inputs, targets, CF.squared_output_norm), targets.shape[0]

        importance, _ = task_gradient_mean(
            self, at, data, self.sample_size, self._generator, batch_sums, task_id=task_id, statistic="importance",
            in_parameter_dtype=False,  # Ω in float32 for a 16-bit model: it is summed over tasks
        )
        return importance

    # ---------------------------------------------------------------------------- state
    def _move_state(self, device: torch.device) -> None:
        self._omega = {name: t.to(device) for name, t in self._omega.items()}
        self._set_penalty({n: t.to(device) for n, t in self._anchor.items()}, dict(self._omega) if self._anchor else None, 0.0)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "anchor": dict(self._anchor),
            "omega": dict(self._omega),
            "generator": self._generator.get_state(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        device = self.device
        self._omega = {n: t.to(device) for n, t in state_dict.get("omega", {}).items()}
        anchor = {n: t.to(device) for n, t in state_dict.get("anchor", {}).items()}
        self._set_penalty(anchor, dict(self._omega) if anchor else None, 0.0)
        if "generator" in state_dict:
            self._generator.set_state(state_dict["generator"].cpu())
